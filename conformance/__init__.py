"""Conformance harness: runs a named catalogue of cases against any vhost-user balloon back-end."""

"""The management API (HTTP on a unix socket) and its client."""

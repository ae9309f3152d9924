"""Fuzzers: frames (protocol/ parsers), device (the sans-I/O model), wire (a live vdev)."""

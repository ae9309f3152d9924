"""The ``vdev`` command line: ``vdev serve`` and the operator commands."""

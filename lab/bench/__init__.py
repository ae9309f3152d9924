"""vballoon benchmarks (``scripts/bench``): how fast memory goes back to the host.

Every figure is measured end to end where the brief says so (guest driver -> vhost-user ->
``vdev serve`` in its own process -> punch-hole reclaim) and compared with the physical
limit measured in the same run on the same machine (:mod:`.raw`). Modules:

* :mod:`.system`  machine and version facts, /proc readers (RSS, CPU), st_blocks
* :mod:`.raw`     the raw kernel limits: punch-hole / MADV_REMOVE of large ranges, and one
                  ``madvise(MADV_REMOVE)`` per 4 KiB page from a Python loop
* :mod:`.model`   the device model alone (``BalloonModel.handle``), no I/O
* :mod:`.e2e`     ``vdev serve`` as a subprocess, our guests (front-end + driver core) in
                  this process, the management API over its unix socket; cases 1-5
* :mod:`.report`  targets, the rich table, JSON, PNG charts
* :mod:`.cli`     ``python -m lab.bench [--quick] [--json F] [--plots DIR]``
"""

SCHEMA = "vballoon-bench/1"

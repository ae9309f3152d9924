"""``python -m lab.fuzz.covprobe DATA_FILE PROBE_SOCKET VDEV_ARGS...``: run ``vdev`` under
coverage.py (branch coverage of ``vdev`` and ``protocol``) and answer coverage probes while
it runs, so that the wire fuzzer can keep the inputs that reach new code inside vdev.

The probe is a unix socket: each connection gets one line, ``ARCS FILES``: the number of
distinct arcs (branch coverage's line-to-line transitions) measured so far and the files they
are in (see :func:`_count`). The data file is written when vdev exits (SIGTERM included: vdev
stops cleanly on it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

import coverage


def _count(cov: coverage.Coverage) -> tuple[int, int]:
    """(arcs, files) measured so far. Fast path: the collector's live per-file sets (never
    flushed while vdev runs, so they hold everything; a dict copy is atomic under the GIL),
    about a millisecond. Else :meth:`coverage.Coverage.get_data` (public, ~100 ms)."""
    live = getattr(getattr(cov, "_collector", None), "data", None)
    if isinstance(live, dict) and _FAST:
        snapshot = live.copy()
        return sum(len(v) for v in snapshot.values()), len(snapshot)
    data = cov.get_data()
    files = data.measured_files()
    return sum(len(data.arcs(f) or ()) for f in files), len(files)


#: Whether this coverage.py keeps its collector's data where :func:`_count` reads it (checked
#: once: mixing both ways would undercount, get_data flushes the live sets).
_FAST = False


def _serve_probe(cov: coverage.Coverage, listener: socket.socket, lock: threading.Lock) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            with lock:
                arcs, lines = _count(cov)
            with contextlib.suppress(OSError):
                conn.sendall(f"{arcs} {lines}\n".encode())


def probe(path: str, timeout: float = 10.0) -> tuple[int, int] | None:
    """``(arcs, files)`` measured so far by the vdev behind ``path``; None if unreachable."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    arcs, lines = data.split()
    return int(arcs), int(lines)


def main(argv: list[str]) -> None:
    data_file, probe_path, *vdev_args = argv
    cov = coverage.Coverage(
        data_file=data_file, branch=True, source=["vdev", "protocol"], config_file=False
    )
    cov.start()
    global _FAST
    _FAST = isinstance(getattr(getattr(cov, "_collector", None), "data", None), dict)
    lock = threading.Lock()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe_path)
    listener.bind(probe_path)
    listener.listen(4)
    threading.Thread(
        target=_serve_probe, args=(cov, listener, lock), daemon=True, name="covprobe"
    ).start()
    try:
        from vdev.cli.main import main as vdev_main

        vdev_main(vdev_args, prog_name="vdev")
    finally:
        listener.close()
        with lock:
            cov.stop()
            cov.save()
        with contextlib.suppress(OSError):
            os.unlink(probe_path)


if __name__ == "__main__":
    main(sys.argv[1:])

"""vdev's log output: text (today's format) or JSON, one object a line, journald-aware.

``vdev serve --log-format json`` writes one JSON object per line on stderr::

    {"time": "2026-12-06T01:02:03.456Z", "level": "info", "logger": "vdev.policy.control",
     "vm": "web1", "event": "target", "message": "target 0 -> 64 MiB (policy: pressure)",
     "target_bytes": 67108864, "previous_bytes": 0, "reason": "pressure"}

``time`` is UTC, ISO 8601 with milliseconds; ``level`` is the Python level name in lower case;
``vm`` is the guest the line is about (``null`` when it is about the process or the host);
``event`` is a short stable word for what happened (``target``, ``host_state``,
``manual_target``, ``policy_target``, ``reset``, ``setting``, ``simulated_free``,
``connected``...; ``null`` for free-form lines); ``message`` is the text line. Extra fields a
call site attaches with ``extra={"fields": {...}}`` are added at the top level.

Under journald (stderr is the journal: ``$JOURNAL_STREAM`` names stderr's device and inode,
systemd.exec(5)) the text format drops its own timestamp (the journal stamps every line) and
prefixes each line with its syslog priority (``<6>`` info, ``<4>`` warning, sd-daemon(3)),
so ``journalctl -p warning`` filters vdev's lines; JSON lines keep their timestamp and get the
prefix too. Levels: DEBUG per-message chatter, INFO things an operator wants in the journal
(connections, every target vdev sets and why, every operator change, host state changes),
WARNING something went wrong that vdev handled (a guest broke the protocol, sampling failed),
ERROR a connection was closed because of an error.

Which guest a line is about comes from ``extra={"vm": NAME}`` or, for everything logged while
serving a connection, from :data:`current_vm` (a context variable the server sets in each
connection's tasks; trio's child tasks and worker threads inherit it).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

#: The guest the current task works for (set by the server in each connection's tasks).
current_vm: contextvars.ContextVar[str | None] = contextvars.ContextVar("vdev_vm", default=None)

LOG_FORMATS = ("text", "json")

#: Python level -> syslog priority (sd-daemon(3) prefixes).
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_JOURNAL_TEXT_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def stream_is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is connected to journald ($JOURNAL_STREAM = "DEVICE:INODE")."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def error_line(text: str, stream: TextIO | None = None) -> str:
    """``text`` as an error line for ``stream`` (stderr): with the ``<3>`` priority prefix
    when it is the journal, so that ``journalctl -p err`` shows why vdev did not start."""
    stream = sys.stderr if stream is None else stream
    return f"<{_PRIORITY[logging.ERROR]}>{text}" if stream_is_journal(stream) else text


class VmFilter(logging.Filter):
    """Gives every record ``vm`` (from ``extra`` or :data:`current_vm`) and ``event``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "vm", None) is None:
            record.vm = current_vm.get()
        if not hasattr(record, "event"):
            record.event = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "vm": getattr(record, "vm", None),
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                obj.setdefault(str(key), value)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        line = json.dumps(obj, default=str, separators=(", ", ": "))
        if self.journal:
            line = f"<{syslog_priority(record.levelno)}>{line}"
        return line


class TextFormatter(logging.Formatter):
    """The text format: a line about one guest starts its message with ``NAME: `` (unless
    the message already does), as the JSON format's ``vm`` key says it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        vm = getattr(record, "vm", None)
        message = record.message
        if not vm or message.startswith((f"{vm}:", f"{vm} ")):
            return super().formatMessage(record)
        record.message = f"{vm}: {message}"
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class JournalTextFormatter(TextFormatter):
    """Text without a timestamp, with the sd-daemon priority prefix."""

    def __init__(self) -> None:
        super().__init__(_JOURNAL_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"


def verbosity_level(verbose: int, quiet: bool = False) -> int:
    """``vdev serve``'s default is INFO (what an operator wants in the journal; ``-v`` is
    accepted and the same), ``-vv`` debug, ``-q`` warnings only."""
    if quiet:
        return logging.WARNING
    return logging.INFO if verbose <= 1 else logging.DEBUG


def setup_logging(
    level: int, log_format: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger: one handler on ``stream`` (stderr) in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    stream = sys.stderr if stream is None else stream
    journal = stream_is_journal(stream)
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(journal=journal)
    elif journal:
        formatter = JournalTextFormatter()
    else:
        formatter = TextFormatter(_TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(VmFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # hypercorn's access log would be one line per API request: keep it at WARNING.
    logging.getLogger("hypercorn.access").setLevel(max(level, logging.WARNING))
    return handler


def event(
    logger: logging.Logger,
    level: int,
    kind: str,
    message: str,
    *args: object,
    vm: str | None = None,
    **fields: Any,
) -> None:
    """Log one structured line: ``event`` = ``kind``, ``vm``, extra JSON ``fields``."""
    logger.log(level, message, *args, extra={"vm": vm, "event": kind, "fields": fields})

"""The services' logs (keep, run, fleet), written with loguru: on a terminal the lines people
read today, and with ``--log-format json`` one JSON object per line for log collectors
(``time``, ``level``, ``service``, ``message``, then the event's own fields; docs/json.md).

The library logs through the standard library instead (``warmpool._log``: a NullHandler, so an
engine that imports warmpool imports nothing more); a running service routes those records
here too.  loguru is imported only when a service starts.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

__all__ = ["LineWriter", "ServiceLog", "current", "start"]

current: ServiceLog | None = None  # the running service's log; ``_common.say`` writes through it
_handler: logging.Handler | None = None


class ServiceLog:
    """One service's log: ``info``/``warning``/``error`` take a readable line and the event's
    fields; ``note`` is a line for the user that reads "warmpool: ..." as text."""

    def __init__(self, logger) -> None:
        self._logger = logger

    def info(self, line: str, **fields) -> None:
        self._logger.bind(fields=fields).info(line)

    def warning(self, line: str, **fields) -> None:
        self._logger.bind(fields=fields).warning(line)

    def error(self, line: str, **fields) -> None:
        self._logger.bind(fields=fields).error(line)

    def note(self, line: str, *, error: bool = False, **fields) -> None:
        logger = self._logger.bind(fields=fields, prefix="warmpool: ")
        (logger.error if error else logger.info)(line)


def _json_line(stream: TextIO):
    def sink(message) -> None:
        record = message.record
        entry = {"time": record["time"].isoformat(), "level": record["level"].name,
                 "service": record["extra"]["service"], "message": record["message"]}
        entry.update({k: v for k, v in record["extra"].get("fields", {}).items() if k not in entry})
        stream.write(json.dumps(entry, default=str) + "\n")
        stream.flush()

    return sink


class LineWriter:
    """A text stream whose every line becomes one log record (another library's prints)."""

    def __init__(self, log: ServiceLog, **fields) -> None:
        self.log, self.fields, self.pending = log, fields, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.log.info(line, **self.fields)
        return len(text)

    def flush(self) -> None:
        pass


class _ToLoguru(logging.Handler):
    """The library's stdlib records (decisions, fallbacks) into the service's log."""

    def __init__(self, log: ServiceLog) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        (self.log.warning if record.levelno >= logging.WARNING else self.log.info)(line, logger=record.name)


def start(service: str, log_format: str, stream: TextIO | None = None, *, prefix: str = "warmpool: ",
          verbose: bool = False) -> ServiceLog:
    """Send this process's service log to ``stream`` (stderr by default) in ``log_format``;
    text lines start with ``prefix``."""
    global current, _handler
    from loguru import logger

    stream = stream or sys.stderr
    logger.remove()  # loguru's default handler writes its own format to stderr
    if log_format == "json":
        logger.add(_json_line(stream), level="INFO", format="{message}")
    else:
        logger.add(stream, level="INFO", format="{extra[prefix]}{message}", colorize=False)
    current = ServiceLog(logger.bind(service=service, prefix=prefix))
    library = logging.getLogger("warmpool")
    if _handler is not None:
        library.removeHandler(_handler)
    _handler = _ToLoguru(current)
    library.addHandler(_handler)
    library.propagate = False
    library.setLevel(logging.INFO if verbose else logging.WARNING)
    return current

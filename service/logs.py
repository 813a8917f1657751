"""Logs on stderr: one JSON object per line (any `extra={...}` fields kept) for machines,
or one readable line per record on a terminal.

``TSAD_LOG_JSON`` unset chooses by stderr: a terminal (`make serve` in a shell) gets
readable lines, anything else (a container, a pipe, a file) JSON. ``true``/``false``
force one or the other.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from service.redaction import install_log_redaction

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# uvicorn adds its message again with ANSI colour codes: noise in a log line
_DROPPED = {"color_message"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD and k not in _DROPPED}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``12:00:01 INFO tsad.service: store ready backend=memory``: the JSON's fields, for
    a person.

    >>> r = logging.makeLogRecord({"name": "tsad.x", "levelname": "INFO", "msg": "ready",
    ...                            "created": 0.0, "msecs": 0.0, "backend": "memory",
    ...                            "color_message": "\\x1b[1mready\\x1b[0m"})
    >>> TextFormatter().format(r)
    '00:00:00 INFO tsad.x: ready backend=memory'
    """

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = (f"{time.strftime('%H:%M:%S', time.gmtime(record.created))} "
                f"{record.levelname} {record.name}: {record.getMessage()}"
                + (f" {extras}" if extras else ""))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", json_lines: bool | None = None) -> None:
    """Log to stderr; ``json_lines`` None: JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs requests
    install_log_redaction()  # no secret in any line, uvicorn's own handlers included

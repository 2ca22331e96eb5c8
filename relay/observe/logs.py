"""Logging: one line per event, every line of a message's life carrying its queue id.

Text lines read like Postfix's (``ID: delivered account=gmail relay=host:25 ...``); JSON
lines have stable keys (ts, level, event, queue_id and the event's fields).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any

from relay.errors import ConfigError
from relay.printable import escape, field_value

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def event(logger: logging.Logger, level: int, name: str, queue_id: str | None = None,
          **fields: Any) -> None:
    """Log one event; fields become key=value in text and keys in JSON."""
    if not logger.isEnabledFor(level):
        return
    parts = [f"{escape(queue_id)}:" if queue_id else "", name]
    for key, value in fields.items():
        if value is None:
            continue
        # Values come from clients and upstreams: escaped, so none can forge a line.
        parts.append(f"{key}={field_value(str(value))}")
    logger.log(level, " ".join(p for p in parts if p),
               extra={"event": name, "queue_id": queue_id, "fields": fields})


def iso_time(ts: float) -> str:
    """An event's time field (until=, next_attempt=): UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class TextFormatter(logging.Formatter):
    """The text format; a message not made by event() (a library's, a config warning) is
    escaped here, so no log line carries a raw control character. Tracebacks keep their
    lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if getattr(record, "event", None) is None:
            record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        # Line by line: an exception's message may quote a client's bytes.
        return "\n".join(escape(line) for line in super().formatException(ei).splitlines())


class JsonFormatter(logging.Formatter):
    """A small formatter of our own so the keys are ours and documented (docs/logging.md).

    json.dumps (ensure_ascii) writes every control character as an escape."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        name = getattr(record, "event", None)
        if name:
            data["event"] = name
            queue_id = getattr(record, "queue_id", None)
            if queue_id:
                data["queue_id"] = queue_id
            for key, value in (getattr(record, "fields", None) or {}).items():
                if value is not None:
                    data[key] = value
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(level: str = "info", fmt: str = "text", file: Path | None = None) -> None:
    """Log to stderr, or to ``file``: reopened when logrotate moves it (no copytruncate)."""
    install_handler(build_handler(fmt, file), level)


def build_handler(fmt: str = "text", file: Path | None = None) -> logging.Handler:
    """The handler for a logging config; ConfigError (naming the key) if the file cannot be
    opened. Nothing is changed yet, so a reload can check this before switching."""
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"logging.file: cannot open {file}: {exc.strerror}"]) from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    return handler


def log_file_problem(file: Path | None) -> str | None:
    """Why ``logging.file`` could not be opened, checked without creating it
    (`relay check-config`); None if it could."""
    if file is None:
        return None
    if file.exists():
        if file.is_dir() or not os.access(file, os.W_OK):
            return f"logging.file: cannot write {file}"
        return None
    parent = file.parent
    if not parent.is_dir():
        return f"logging.file: no such directory {parent}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"logging.file: cannot create files in {parent}"
    return None


def install_handler(handler: logging.Handler, level: str = "info") -> None:
    """Make ``handler`` the only one on the root logger."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()  # a log file's handler closes its file (a stream handler keeps stderr)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # aiosmtpd logs every session at INFO ("Peer: ...", "connection lost"); keep it quiet.
    logging.getLogger("mail.log").setLevel(max(LEVELS[level], logging.WARNING))

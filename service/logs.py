"""Logging for every seqtune process: text for people or JSON lines for log pipelines
(``SEQTUNE_LOG_FORMAT=json``), each record carrying the study and trial it concerns.

    with log_context(study="sunspots", trial=7):
        log.info("epoch done")     # -> {"msg": "epoch done", "study": "sunspots", "trial": 7, ...}
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "seqtune_log", default=None)
FIELDS = ("study", "trial", "attempt", "worker")


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (study, trial, attempt, worker) to every record logged inside."""
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **{k: v for k, v in fields.items()
                                                if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current log context onto each record (``record.study`` and so on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _CONTEXT.get() or {}
        for k in FIELDS:
            if not hasattr(record, k):
                setattr(record, k, ctx.get(k))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
            "pid": record.process}
        for k in FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, prefix: str = "") -> None:
        super().__init__(f"%(asctime)s %(levelname)s {prefix}%(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS
                        if getattr(record, k, None) is not None)
        return f"{line} [{tags}]" if tags else line


def setup_logging(prefix: str = "") -> None:
    """Configure the root logger from SEQTUNE_LOG_LEVEL (INFO) and SEQTUNE_LOG_FORMAT
    (text | json). Safe to call more than once."""
    level = os.environ.get("SEQTUNE_LOG_LEVEL", "INFO").upper()
    fmt = os.environ.get("SEQTUNE_LOG_FORMAT", "text").lower()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(prefix))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_seqtune", False):
            root.removeHandler(h)
    handler._seqtune = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise

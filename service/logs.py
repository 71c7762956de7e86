"""Logging for every seqtune process: text for people or JSON lines for log pipelines
(``Settings.log_format``, ``SEQTUNE_LOG_FORMAT=json``), each record carrying the study and trial
it concerns.

    with log_context(study="sunspots", trial=7):
        log.info("epoch done")     # -> {"msg": "epoch done", "study": "sunspots", "trial": 7, ...}
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "seqtune_log", default=None
)
FIELDS = ("study", "trial", "attempt", "worker")


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (study, trial, attempt, worker) to every record logged inside."""
    token = _CONTEXT.set(
        {**(_CONTEXT.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    )
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


# API keys are "st_" + 43 URL-safe characters (service.store.keys). From 24 on, so a cut or
# mistyped key is caught too; not inside a word, so "first_..." names stay readable.
_KEY = re.compile(r"(?<![A-Za-z0-9_-])st(?:_|%5[fF])[A-Za-z0-9_-]{24,}")
# Query parameters whose names say they hold a secret: the value goes, the name stays.
_SECRET_PARAM = re.compile(
    r"(?i)([?&;][a-z0-9_.%-]*(?:key|token|secret|passw|auth|session|signature)[a-z0-9_.%-]*=)"
    r"[^&;#\s\"]*"
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with every API key and the value of every secret-named query parameter
    (``key``, ``api_key``, ``token``, ``password``...) replaced by ``[redacted]``."""
    if "=" in text:
        text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    if "st" in text:
        text = _KEY.sub("st_" + REDACTED, text)
    return text


class RedactFilter(logging.Filter):
    """Redacts (``redact``) a record's message and each of its string arguments in place.
    Arguments one by one, not the formatted line, because uvicorn's access formatter unpacks
    them (client, method, path with query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


def redact_access_log() -> None:
    """Put a RedactFilter on uvicorn's loggers. Safe to call more than once. A filter on the
    logger (not a handler) because uvicorn installs its own handlers, and keeps filters."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactFilter) for f in logger.filters):
            logger.addFilter(RedactFilter())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
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
        tags = " ".join(
            f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None) is not None
        )
        return f"{line} [{tags}]" if tags else line


def setup_logging(settings: Settings, prefix: str = "") -> None:
    """Configure the root logger from ``settings.log_level`` (an unknown level name means
    INFO) and ``settings.log_format`` (text | json); ``prefix`` starts each text line's logger
    name (a slot's number). Safe to call more than once: it replaces its own handler."""
    level = settings.log_level.upper()
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json" else TextFormatter(prefix)
    )
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter())  # no record of any logger prints an API key
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_seqtune", False):
            root.removeHandler(h)
    handler._seqtune = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    # Alembic announces its plugins, its dialect and every revision it applies at INFO, at each
    # start: noise, ours (seqtune.db says when the schema changed) and Optuna's alike. Shown
    # again at DEBUG.
    logging.getLogger("alembic").setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)
    redact_access_log()


# uvicorn's start-up lines, which `seqtune up` replaces with its own summary (the URL first).
_UVICORN_START = (
    "Started server process",
    "Waiting for application startup",
    "Application startup complete",
    "Uvicorn running on",
)


class _DropUvicornStart(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and isinstance(record.msg, str)
            and record.msg.startswith(_UVICORN_START)
        )


def quiet_uvicorn_start() -> None:
    """Drop uvicorn's INFO lines about starting (process, startup, "running on"); its
    warnings, errors and shutdown lines stay. Safe to call more than once."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropUvicornStart) for f in logger.filters):
        logger.addFilter(_DropUvicornStart())

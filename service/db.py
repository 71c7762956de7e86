"""The one seam between seqtune and its database.

``Database.run(fn)`` is the only way code touches the database: it opens a session, commits on
success, rolls back on error, retries when the connection was lost (Postgres restarted, idle
connection cut), and translates driver errors into domain errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import AlreadyExists, Unavailable
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def engine_kwargs(settings: Settings) -> dict[str, Any]:
    """Engine options shared by our engine and Optuna's RDBStorage on the same database."""
    if settings.is_sqlite:
        return {"connect_args": {"check_same_thread": False, "timeout": 30}}
    return {
        # Optuna turns pre-ping on only for MySQL; Postgres drops idle connections too.
        "pool_pre_ping": True,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_recycle": settings.pool_recycle_s,
        "pool_timeout": 30,
        "connect_args": {"connect_timeout": 10, "application_name": "seqtune"},
    }


def make_engine(settings: Settings) -> Engine:
    """Create an engine for ``settings.url``; for SQLite, make the data folder and turn on WAL."""
    if settings.is_sqlite:
        path = settings.url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.url, **engine_kwargs(settings))
    if settings.is_sqlite:

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def _disconnect_in(exc: BaseException) -> DBAPIError | None:
    """The lost-connection error behind ``exc``, following causes: Optuna wraps SQLAlchemy's
    errors in its own StorageInternalError."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, DBAPIError) and _is_disconnect(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        markers = (
            "connection refused", "server closed the connection", "terminating connection",
            "could not connect", "connection not open", "the database system is starting up",
            "the database system is shutting down", "ssl connection has been closed",
            "connection already closed", "database is locked",
        )
        return any(m in text for m in markers)
    return False


class Database:
    """An engine plus the transaction helper every data-layer function goes through."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def read(self, fn: Callable[[Connection], T]) -> T:
        """Run a read-only ``fn(connection)`` on a plain Core connection (no ORM session):
        the cheap path for hot reads. Retried and translated like ``run``."""
        return self._retrying(lambda: self._read_once(fn), retry=True)

    def _read_once(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            return fn(conn)

    def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` in a Core transaction (commit on return, rollback on error):
        the cheap path for hot single-statement writes. Retried and translated like ``run``."""
        return self._retrying(lambda: self._write_once(fn), retry=True)

    def _write_once(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return fn(conn)

    def run(self, fn: Callable[[Session], T], *, retry: bool = True) -> T:
        """Run ``fn(session)`` in one transaction and return its result.

        Commits when ``fn`` returns, rolls back when it raises. A lost connection is retried
        with exponential backoff (``fn`` must then be safe to run again, which holds because
        the failed attempt was rolled back). Raises ``AlreadyExists`` on a unique violation and
        ``Unavailable`` when the database stays unreachable.
        """
        return self._retrying(lambda: self._run_once(fn), retry=retry)

    def _run_once(self, fn: Callable[[Session], T]) -> T:
        with self._sessions() as session, session.begin():
            return fn(session)

    def _retrying(self, once: Callable[[], T], *, retry: bool) -> T:
        attempts = self.settings.db_retries + 1 if retry else 1
        delay = self.settings.db_retry_backoff_s
        for attempt in range(1, attempts + 1):
            try:
                return once()
            except IntegrityError as exc:
                raise AlreadyExists(_integrity_message(exc)) from exc
            except Exception as exc:
                lost = _disconnect_in(exc)
                if lost is None:
                    raise
                if attempt == attempts:
                    raise Unavailable(
                        "the database is unreachable; retry shortly "
                        f"({type(lost.orig).__name__ if lost.orig else type(lost).__name__})"
                    ) from exc
                log.warning("database connection lost (attempt %d/%d), retrying in %.1fs",
                            attempt, attempts, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        """Close pooled connections (call before forking or at shutdown)."""
        self.engine.dispose()


def _integrity_message(exc: IntegrityError) -> str:
    text = str(exc.orig) if exc.orig is not None else str(exc)
    return "a record with the same unique key already exists: " + text.splitlines()[0][:200]

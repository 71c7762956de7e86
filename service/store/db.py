"""The one seam between seqtune and its database.

``Database.run(fn)`` is the only way code touches the database: it opens a session, commits on
success, rolls back on error, retries when the connection was lost (Postgres restarted, idle
connection cut), and translates driver errors into domain errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from seqtune.errors import AlreadyExists, Unavailable
from seqtune.views import Page
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def page(rows: Sequence[R], limit: int, offset: int, view: Callable[[R], T]) -> Page[T]:
    """One page of a listing read with ``limit + 1`` rows: the extra row only tells that
    there is a next page."""
    more = len(rows) > limit
    return Page(items=[view(r) for r in rows[:limit]], next_offset=offset + limit if more else None)


def engine_kwargs(settings: Settings) -> dict[str, Any]:
    """Engine options shared by our engine and Optuna's RDBStorage on the same database.

    On Postgres every connection carries the session limits of ``session_limits``: the
    reaper skips locked trials, so both engines must let the server end a frozen session."""
    if settings.is_sqlite:
        return {"connect_args": {"check_same_thread": False, "timeout": 30}}
    return {
        # Optuna turns pre-ping on only for MySQL; Postgres drops idle connections too.
        "pool_pre_ping": True,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_recycle": settings.pool_recycle_s,
        "pool_timeout": 30,
        "connect_args": {
            "connect_timeout": 10,
            "application_name": "seqtune",
            **session_limits(settings),
        },
    }


def _ms(seconds: float) -> int:
    """A positive duration in whole milliseconds (Postgres' unit), never rounded down to 0,
    which would mean "no limit"."""
    return max(1, round(seconds * 1000))


def server_limits(settings: Settings) -> dict[str, int]:
    """The Postgres settings that bound how long a session can hold on, in their default
    units (milliseconds, keepalives in seconds), each mapped to 0 where turned off:
    ``idle_in_transaction_session_timeout`` ends a session frozen inside a transaction and
    frees its row locks; ``statement_timeout`` and ``lock_timeout`` bound statements;
    ``tcp_keepalives_*`` and ``tcp_user_timeout`` drop a partitioned client.

    They reach the server as ``settings.db_session_limits`` says: in the startup packet
    (``session_limits``) or as the role's defaults in seqtune's database (``role_limits``,
    applied by ``seqtune db upgrade``)."""
    keep = settings.db_keepalives_idle_s
    every, count = settings.db_keepalives_interval_s, settings.db_keepalives_count
    return {
        "idle_in_transaction_session_timeout": _ms_or_off(
            settings.db_idle_in_transaction_timeout_s
        ),
        "statement_timeout": _ms_or_off(settings.db_statement_timeout_s),
        "lock_timeout": _ms_or_off(settings.db_lock_timeout_s),
        "tcp_keepalives_idle": keep,
        "tcp_keepalives_interval": every if keep else 0,
        "tcp_keepalives_count": count if keep else 0,
        # Keepalives probe only an idle connection; with unacknowledged data in flight the
        # kernel retransmits for about 15 minutes instead. The user timeout bounds that too.
        "tcp_user_timeout": (keep + every * count) * 1000 if keep else 0,
    }


def _ms_or_off(seconds: float) -> int:
    return _ms(seconds) if seconds else 0


def role_limits(settings: Settings) -> dict[str, int]:
    """What ``seqtune db upgrade`` sets on the connecting role in seqtune's database when
    ``settings.db_session_limits`` is ``"role"`` (0: reset to the server's default); empty
    otherwise, and on SQLite."""
    if settings.is_sqlite or settings.db_session_limits != "role":
        return {}
    return server_limits(settings)


def session_limits(settings: Settings) -> dict[str, Any]:
    """libpq connection parameters that bound how long a Postgres session can hold on.

    - Server side (``server_limits``), with ``db_session_limits="startup"`` (the default):
      sent as ``options`` in the startup packet, so they hold from the first statement, on our
      pool and Optuna's alike, with no extra round trip. PgBouncer refuses any startup
      ``options`` ("unsupported startup parameter"): behind it, ``"role"`` sends none and has
      ``seqtune db upgrade`` make them the role's defaults instead (``role_limits``).
    - Client side, always: libpq's ``keepalives*`` and ``tcp_user_timeout``, so a worker
      waiting on a partitioned server (or pooler) gets an error (a disconnect, retried)
      instead of waiting forever. libpq applies these to its own socket; they are not sent
      to the server, so a pooler never sees them.

    Settings of 0 send nothing. An ``options`` value in the database URL is kept, ours
    appended.
    """
    out: dict[str, Any] = {}
    if settings.db_keepalives_idle_s:
        idle, every = settings.db_keepalives_idle_s, settings.db_keepalives_interval_s
        count = settings.db_keepalives_count
        out.update(
            keepalives=1, keepalives_idle=idle, keepalives_interval=every, keepalives_count=count
        )
        if _libpq_version(settings.url) >= 120000:  # older libpq refuses the parameter
            out["tcp_user_timeout"] = (idle + every * count) * 1000
    gucs = server_limits(settings) if settings.db_session_limits == "startup" else {}
    mine = " ".join(f"-c {k}={v}" for k, v in gucs.items() if v)
    if mine:
        theirs = make_url(settings.url).query.get("options")
        if isinstance(theirs, tuple):
            theirs = " ".join(theirs)
        out["options"] = f"{theirs} {mine}" if theirs else mine
    return out


def _libpq_version(url: str) -> int:
    """The libpq version the URL's driver links (e.g. 170011), 0 when unknown."""
    try:
        if make_url(url).get_driver_name() == "psycopg":
            import psycopg

            return int(psycopg.pq.version())
        import psycopg2.extensions

        return int(psycopg2.extensions.libpq_version())
    except Exception:  # noqa: BLE001 - unknown driver: leave the optional parameter out
        return 0


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


def _timeout_in(exc: BaseException) -> str | None:
    """``"statement"`` or ``"lock"`` when Postgres cancelled a statement for running or
    waiting too long (``db_statement_timeout_s`` / ``db_lock_timeout_s``), else None.
    Follows causes like ``_disconnect_in``."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, DBAPIError) and seen.orig is not None:
            code = getattr(seen.orig, "pgcode", None) or getattr(seen.orig, "sqlstate", None)
            if code == "55P03":  # lock_not_available
                return "lock"
            if code == "57014" and "statement timeout" in str(seen.orig):  # query_canceled
                return "statement"
        seen = seen.__cause__ or seen.__context__
    return None


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        markers = (
            "connection refused",
            "server closed the connection",
            "terminating connection",
            "could not connect",
            "connection not open",
            "the database system is starting up",
            "the database system is shutting down",
            "ssl connection has been closed",
            "connection already closed",
            "database is locked",
            # PgBouncer's words for the same: its server went away or is not back yet, or
            # every server connection stayed busy (query_wait_timeout). All pass.
            "server conn crashed",
            "server login has been failing",
            "pgbouncer cannot connect to server",
            "query_wait_timeout",
            "no more connections allowed",
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

    def autocommit(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` with no transaction around it: each statement commits by
        itself, with no round trip for BEGIN or COMMIT and no lock held between statements
        (for one statement that does all its work). Translated like ``run``, but never
        retried: a statement whose connection was lost may have committed (``Unavailable``
        is raised; the caller decides)."""
        return self._retrying(lambda: self._autocommit_once(fn), retry=False)

    def _autocommit_once(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            return fn(conn.execution_options(isolation_level="AUTOCOMMIT"))

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
            started = time.monotonic()
            try:
                return once()
            except IntegrityError as exc:
                raise AlreadyExists(_integrity_message(exc)) from exc
            except Exception as exc:
                lost = _disconnect_in(exc)
                timeout = _timeout_in(exc) if lost is None else None
                if timeout == "statement":
                    # The same statement would run as long again: report, do not retry.
                    raise Unavailable(
                        "the database did not answer within "
                        "SEQTUNE_DB_STATEMENT_TIMEOUT_S; retry later"
                    ) from exc
                if lost is None and timeout is None:
                    raise
                if lost is None:  # a lock wait timed out: contention is transient, retry
                    if attempt == attempts:
                        raise Unavailable(
                            "the database is busy (a lock wait timed out); retry shortly"
                        ) from exc
                    log.warning(
                        "lock wait timed out (attempt %d/%d), retrying in %.1fs",
                        attempt,
                        attempts,
                        delay,
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                idle_limit = self.settings.db_idle_in_transaction_timeout_s
                if idle_limit and time.monotonic() - started >= idle_limit:
                    # libpq reports only "server closed the connection", not why; an attempt
                    # that outlived the limit was most likely ended for idling in its
                    # transaction (this process was frozen, or paused inside one too long).
                    # The work was rolled back and is retried; if this repeats without a
                    # freeze, something legitimately pauses longer than the limit.
                    log.warning(
                        "the database ended a transaction after %.0fs, likely for "
                        "idling longer than SEQTUNE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S="
                        "%s",
                        time.monotonic() - started,
                        idle_limit,
                    )
                if attempt == attempts:
                    raise Unavailable(
                        "the database is unreachable; retry shortly "
                        f"({type(lost.orig).__name__ if lost.orig else type(lost).__name__})"
                    ) from exc
                log.warning(
                    "database connection lost (attempt %d/%d), retrying in %.1fs",
                    attempt,
                    attempts,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        """Close pooled connections (call before forking or at shutdown)."""
        self.engine.dispose()


def _integrity_message(exc: IntegrityError) -> str:
    text = str(exc.orig) if exc.orig is not None else str(exc)
    return "a record with the same unique key already exists: " + text.splitlines()[0][:200]

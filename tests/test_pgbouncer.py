"""seqtune behind PgBouncer in transaction pooling mode: the session limits reach every
session without startup options (``SEQTUNE_DB_SESSION_LIMITS=role``), and a worker slot's
pools are small. The fleet itself runs through PgBouncer in test_fleet.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from service.settings import Settings
from service.store.db import Database, session_limits
from service.store.optuna import make_storage
from tests.conftest import seqtune_cmd
from tests.pgbouncer import PgBouncer

LIMITS = (
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "lock_timeout",
    "tcp_keepalives_idle",
    "tcp_user_timeout",
)


def _show(conn: Any) -> list[str]:
    return [conn.execute(text(f"SHOW {n}")).scalar() for n in LIMITS]


def test_startup_options_are_refused_so_role_limits_reach_every_session(
    settings: Settings, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    url = pgbouncer.url(settings.url)
    startup = settings.model_copy(update={"database_url": url, "db_retries": 0})
    # The default sends the limits as startup options, which PgBouncer refuses outright.
    assert "options" in session_limits(startup)
    db = Database(startup)
    with pytest.raises(OperationalError, match="unsupported startup parameter: options"):
        db.read(lambda c: c.execute(text("SELECT 1")).scalar())
    db.dispose()

    # `seqtune db upgrade` through PgBouncer puts them on the role instead.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env.update(
        SEQTUNE_DATABASE_URL=url,
        SEQTUNE_DATA_DIR=str(tmp_path),
        SEQTUNE_DB_SESSION_LIMITS="role",
        SEQTUNE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S="7",
        SEQTUNE_DB_LOCK_TIMEOUT_S="2.5",
    )
    r = subprocess.run(
        [*seqtune_cmd(), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "idle_in_transaction_session_timeout=7000" in r.stdout

    role = startup.model_copy(
        update={
            "db_session_limits": "role",
            "db_idle_in_transaction_timeout_s": 7,
            "db_lock_timeout_s": 2.5,
        }
    )
    kw = session_limits(role)
    assert "options" not in kw  # nothing PgBouncer would refuse
    assert kw["keepalives"] == 1  # libpq's own socket options stay: they never reach a server
    want = ["7s", "10min", "2500ms", "10", "25000"]
    db = Database(role)
    try:
        # Two sessions at once: one is the upgrade's server connection, the other a fresh
        # server session, which starts with the role's settings in this database.
        with db.engine.connect() as a, db.engine.connect() as b:
            pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in (a, b)}
            assert len(pids) == 2
            assert _show(a) == want and _show(b) == want
            dsn = a.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
            assert dsn["keepalives_idle"] == "10"
        storage = make_storage(role)  # Optuna's engine: the same limits, no options either
        with storage.engine.connect() as c:
            assert _show(c) == want
        storage.engine.dispose()
    finally:
        db.dispose()

    # Scoped to seqtune's database: the role's sessions elsewhere are untouched.
    direct = Database(role.model_copy(update={"database_url": settings.url}))
    try:
        assert (
            direct.read(
                lambda c: c.execute(
                    text(
                        "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d "
                        "ON d.oid = s.setdatabase WHERE d.datname = current_database() "
                        "AND s.setrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
                    )
                ).scalar()
            )
            == 1
        )
    finally:
        direct.dispose()


def test_role_limits_turned_off_are_reset(settings: Settings) -> None:
    """A limit set to 0 after it was on leaves the role's default, not a stale value."""
    from service.store import migrate

    role = settings.model_copy(update={"db_session_limits": "role"})
    db = Database(role)
    try:
        migrate.upgrade(db.engine, settings=role)
        off = role.model_copy(update={"db_statement_timeout_s": 0})
        migrate.upgrade(db.engine, settings=off)
        config = db.read(
            lambda c: c.execute(
                text(
                    "SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d "
                    "ON d.oid = s.setdatabase WHERE d.datname = current_database()"
                )
            ).scalar()
        )
    finally:
        db.dispose()
    assert "idle_in_transaction_session_timeout=30000" in config
    assert not [c for c in config if c.startswith("statement_timeout")]


def test_a_worker_slot_gets_small_pools(settings: Settings) -> None:
    """Both engines of a slot (seqtune's, Optuna's) are sized by worker_pool_size and
    worker_max_overflow, not by the service's pool_size / max_overflow."""
    from worker.cli import worker_settings

    loaded = settings.model_copy(update={"pool_size": 5, "max_overflow": 10})
    slot = worker_settings(loaded)
    assert (slot.pool_size, slot.max_overflow) == (1, 2)
    assert slot.db_retries >= 12
    db = Database(slot)
    storage = make_storage(slot)
    try:
        for pool in (db.engine.pool, storage.engine.pool):
            assert (pool.size(), pool._max_overflow) == (1, 2)  # type: ignore[attr-defined]
    finally:
        db.dispose()
        storage.engine.dispose()

"""Apply and inspect seqtune's migrations (``seqtune db upgrade``; the service at start)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from service.settings import Settings
from service.store.db import role_limits

log = logging.getLogger("seqtune.db")
VERSION_TABLE = "seqtune_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# Any constant works; it only has to differ from other applications' advisory locks.
_ADVISORY_LOCK_KEY = 0x5E97_0001


def include_name(name: str | None, type_: str, _parent: Any) -> bool:
    """Autogenerate and schema comparison see only seqtune's tables, never Optuna's."""
    if type_ == "table":
        return bool(name) and str(name).startswith("seqtune_") and name != VERSION_TABLE
    return True


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _revision(conn)


def _revision(conn: Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def upgrade(engine: Engine, revision: str = "head", *, settings: Settings | None = None) -> None:
    """Bring seqtune's tables to ``revision``. Safe to run from several processes at once:
    on Postgres an advisory lock serialises concurrent upgrades (a transaction-scoped one:
    it holds behind PgBouncer's transaction pooling too).

    With ``settings`` whose ``db_session_limits`` is ``"role"``, also makes the session
    limits the connecting role's defaults in this database (``set_role_limits``), in the
    same transaction."""
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            _unbounded(conn)
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
        cfg.attributes["connection"] = conn
        before = _revision(conn)
        command.upgrade(cfg, revision)
        after = _revision(conn)
        if after != before:  # alembic's own lines are quiet at INFO (service.logs)
            log.info("seqtune's database schema upgraded from %s to %s", before or "none", after)
        if settings is not None and conn.dialect.name == "postgresql":
            set_role_limits(conn, role_limits(settings))


def set_role_limits(conn: Connection, limits: Mapping[str, int]) -> None:
    """``ALTER ROLE CURRENT_USER IN DATABASE <this one> SET`` each of ``limits`` (RESET for
    0): every later session of this role in this database starts with them, whatever sends
    it there (PgBouncer included, which refuses them as startup options). Scoped to this
    database so the role's other work is untouched; any role may set its own defaults.

    Other sessions already open keep their values (behind PgBouncer: its ``RECONNECT``
    command, or ``server_lifetime``, renews them). This one takes the new values at once:
    behind PgBouncer it is the server connection the next client (a worker) is likely handed,
    and without them it would serve that client unbounded for as long as it lives."""
    if not limits:
        return
    name = conn.execute(text("SELECT current_database()")).scalar_one()
    where = 'ALTER ROLE CURRENT_USER IN DATABASE "{}"'.format(str(name).replace('"', '""'))
    for guc, value in limits.items():
        # Names come from server_limits and values are ints: nothing here is user text.
        conn.execute(text(f"{where} SET {guc} = {int(value)}" if value else f"{where} RESET {guc}"))
        if value:
            # Session-wide on purpose (not SET LOCAL): the value every new session of the
            # role gets from now on anyway, so no later user of this connection is surprised.
            conn.execute(text("SELECT set_config(:g, :v, false)"), {"g": guc, "v": str(value)})


def _unbounded(conn: Connection) -> None:
    """Lift the session's statement and lock timeouts (SEQTUNE_DB_STATEMENT_TIMEOUT_S,
    SEQTUNE_DB_LOCK_TIMEOUT_S) for this migration transaction only: rewriting a large table,
    or waiting for another process's upgrade behind the advisory lock, may take minutes."""
    conn.execute(text("SET LOCAL statement_timeout = 0"))
    conn.execute(text("SET LOCAL lock_timeout = 0"))


def downgrade(engine: Engine, revision: str) -> None:
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            _unbounded(conn)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def revision(engine: Engine, message: str) -> None:
    """Autogenerate a new migration from the models (developers only)."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)

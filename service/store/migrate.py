"""Apply and inspect seqtune's migrations (``seqtune db upgrade``; the service at start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

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
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring seqtune's tables to ``revision``. Safe to run from several processes at once:
    on Postgres an advisory lock serialises concurrent upgrades."""
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            _unbounded(conn)
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


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

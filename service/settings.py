"""One typed settings object, read from ``SEQTUNE_*`` environment variables, validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from seqtune.errors import Invalid

DEFAULT_DATA_DIR = Path("seqtune-data")


class Settings(BaseSettings):
    """Everything seqtune reads from its environment.

    With no ``SEQTUNE_DATABASE_URL`` the service and workers share an embedded SQLite file under
    ``SEQTUNE_DATA_DIR``; with a ``postgresql://`` URL they share Postgres.
    """

    model_config = SettingsConfigDict(env_prefix="SEQTUNE_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset means an SQLite file in data_dir."
    )
    optuna_database_url: str | None = Field(
        default=None,
        description="Where Optuna's storage connects: the same database as database_url, by "
        "another route. Unset: database_url. Behind PgBouncer, a second database entry for the "
        "same database, so that Optuna's connections have a pool of their own: seqtune holds "
        "its transaction open while Optuna writes (a report, a tell, an ask), and with one "
        "shared pool those held transactions could take every server connection while each "
        "waits for one more (deploy/pgbouncer/README.md).",
    )
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Checkpoints, caches, SQLite.")
    auth_enabled: bool = Field(
        default=True, description="Require 'Authorization: Bearer <key>' on every /v1 call."
    )
    auth_cache_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="How long a verified key is trusted without a lookup; revocations made "
        "in another process take effect within this time. 0 looks every key up.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    migrate_on_start: bool = True
    pool_size: int = Field(
        default=5, ge=1, le=200, description="Connections kept per engine (the service's)."
    )
    max_overflow: int = Field(
        default=10, ge=0, le=500, description="Connections opened past pool_size at peaks."
    )
    # A worker slot holds two engines (seqtune's and Optuna's) used by up to three threads at
    # once (the trial loop; the heartbeat; the stocker, ``service.store.stocker``). Each keeps
    # one connection, the trial loop's, and opens up to two more for moments when the others
    # need one too, closed once returned: a slot holds 2 at rest and at most 6, and a fleet's
    # connections follow its slots, not its peaks.
    # `seqtune worker` gives its slots these instead of pool_size / max_overflow.
    worker_pool_size: int = Field(
        default=1, ge=1, le=50, description="pool_size of each of a worker slot's two engines."
    )
    worker_max_overflow: int = Field(
        default=2, ge=0, le=50, description="max_overflow of each of a worker slot's engines."
    )
    pool_recycle_s: int = Field(default=1800, ge=30)
    db_retries: int = Field(default=5, ge=0, le=50, description="Retries on a lost connection.")
    db_retry_backoff_s: float = Field(default=0.2, gt=0, le=30)
    # Server-side limits on every Postgres session seqtune opens (ours and Optuna's); 0 turns
    # one off. They exist so that a frozen client (SIGSTOP, hung driver, network partition)
    # cannot keep row locks forever: the reaper skips locked trials, so a lock that is never
    # released is a trial that is never recovered.
    db_idle_in_transaction_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=86400,
        description="Postgres ends a session idle inside a transaction this long, releasing its "
        "locks; a frozen worker's trial is then recovered after max(lease_timeout_s, this) plus "
        "the reap interval. It must exceed the longest pause seqtune makes inside a "
        "transaction: a claim's sampling under the study's ask lock (its own trial and at most "
        "about 2 s more of suggestions for the buffer; raise it for GP samplers on large "
        "studies).",
    )
    db_statement_timeout_s: float = Field(
        default=600.0,
        ge=0,
        le=86400,
        description="Postgres cancels a statement (lock waits included) running this long. A "
        "last-resort bound: far above any legitimate seqtune statement (uploads, study loads); "
        "migrations are exempt.",
    )
    db_lock_timeout_s: float = Field(
        default=0.0,
        ge=0,
        le=86400,
        description="Postgres cancels a statement waiting this long for a lock (retried). Off "
        "by default: a claim that asks Optuna itself holds its study's row for that ask() "
        "(pops and finishes of the study wait for it), and a frozen holder is already ended "
        "by the idle-in-transaction timeout.",
    )
    db_session_limits: Literal["startup", "role", "off"] = Field(
        default="startup",
        description="How the server-side limits above (idle-in-transaction, statement and "
        "lock timeouts, server TCP keepalives) reach each Postgres session: 'startup' sends "
        "them as libpq options on every connection; 'role' sends none (PgBouncer refuses "
        "startup options) and `seqtune db upgrade` sets them on the connecting role for "
        "seqtune's database (ALTER ROLE CURRENT_USER IN DATABASE ... SET); 'off' does neither.",
    )
    db_keepalives_idle_s: int = Field(
        default=10,
        ge=0,
        le=7200,
        description="TCP keepalives on both ends of each connection: the first probe after "
        "this many idle seconds; 0 turns keepalives (and the TCP user timeout) off.",
    )
    db_keepalives_interval_s: int = Field(default=5, ge=1, le=600)
    db_keepalives_count: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Probes lost before a peer is dead: a partitioned peer is dropped after "
        "idle + interval x count seconds (25 by default), also with data in flight (TCP user "
        "timeout).",
    )
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="JSON bodies.")
    reap_interval_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="How often the service recovers trials of dead workers; 0 turns it off.",
    )
    checkpoint_every_s: float = Field(
        default=30.0,
        ge=0,
        le=86400,
        description="Workers snapshot a running trial at most this often (and on SIGTERM).",
    )
    # Worker timing. Each slot reads these from the Settings its fleet hands it, and the
    # service reads lost_after_s to call a silent worker lost.
    heartbeat_s: float = Field(
        default=5.0, gt=0, le=600, description="How often a worker slot writes its heartbeat."
    )
    lost_after_s: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description="A worker silent this long is listed as lost (keep it several heartbeats).",
    )
    worker_reap_every_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="How often an idle worker slot recovers trials of dead workers.",
    )
    poll_s: float = Field(
        default=0.5, gt=0, le=600, description="How long an idle slot waits between claims."
    )
    orphan_grace_s: float = Field(
        default=3.0,
        gt=0,
        le=600,
        description="After its `seqtune worker` parent dies, a slot gets this long to finish "
        "its epoch, and as long again to hand its trial back, before it is stopped.",
    )
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="'text' for people, 'json' for log collectors."
    )
    tensorboard_dir: Path | None = Field(
        default=None,
        description="Workers write TensorBoard event files per trial here "
        "(needs the 'tensorboard' extra).",
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _fold_case(cls, v: object, info: ValidationInfo) -> object:
        if not isinstance(v, str):
            return v
        return v.strip().lower() if info.field_name == "log_format" else v.strip().upper()

    @field_validator("database_url", "optuna_database_url")
    @classmethod
    def _normalise_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or v.strip() == "":
            return None
        v = v.strip()
        # Heroku-style and libpq-style URLs name no driver; SQLAlchemy wants one.
        if v.startswith("postgres://"):
            v = "postgresql://" + v[len("postgres://") :]
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg2://" + v[len("postgresql://") :]
        if not (v.startswith("postgresql+") or v.startswith("sqlite")):
            name = f"SEQTUNE_{(info.field_name or 'database_url').upper()}"
            raise ValueError(f"{name} must be a postgresql:// or sqlite:/// URL")
        return v

    @property
    def url(self) -> str:
        """The effective database URL (the embedded SQLite file when none is configured)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'seqtune.db').resolve()}"

    @property
    def optuna_url(self) -> str:
        """The URL Optuna's storage connects to (``optuna_database_url``, else ``url``)."""
        return self.optuna_database_url or self.url

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Settings from the environment with ``overrides`` (a command line's options) on top.

        Raises Invalid with one line naming the SEQTUNE_* variable of the first bad value,
        which is what a command prints (instead of pydantic's report)."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = str(err["msg"]).removeprefix("Value error, ")
            var = (
                cls.model_config.get("env_prefix", "")
                + "_".join(str(x) for x in err["loc"]).upper()
            )
            raise Invalid(msg if var in msg else f"{var}: {msg}") from None

    def child_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a child process that must run with exactly these settings:
        ``environ`` (default: this process's) with each field's SEQTUNE_* variable replaced by
        this object's value, and dropped where the value is None (the child's default).
        Variables that are no field (SEQTUNE_URL, PATH ...) pass through.

        Why every field and not only the changed ones: a child builds its Settings from its
        environment alone, so what this process decided (a ``--database-url``, ``--no-auth``)
        reaches it only this way, and rendering all of them leaves nothing to forget."""
        prefix = self.model_config.get("env_prefix", "")
        names = {f"{prefix}{name}".upper() for name in type(self).model_fields}
        # Names compare without case: pydantic-settings reads its variables that way.
        env = {
            k: v
            for k, v in (os.environ if environ is None else environ).items()
            if k.upper() not in names
        }
        for name, value in self:
            if value is not None:
                env[f"{prefix}{name}".upper()] = _env_value(value)
        return env


def _env_value(value: object) -> str:
    """A field's value as its environment variable spells it (pydantic-settings reads it back
    to the same value): booleans as true/false, the rest as str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()

"""SQLAlchemy models of seqtune's own tables. Every table is named ``seqtune_*``.

Optuna's tables (studies, trials, ...) live in the same database and belong to Optuna: nothing
here references them by foreign key, and nothing in seqtune writes them except through Optuna.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on Postgres, JSON text elsewhere (SQLite).
JsonType = JSON().with_variant(JSONB(), "postgresql")
# The same, but Python None is SQL NULL rather than JSON 'null': for columns whose NULL means
# "not yet" and is tested with IS NULL in compare-and-set statements (studies.baselines).
NullableJsonType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always hands back an aware UTC datetime.

    Postgres returns aware values already; SQLite stores text without an offset and hands back
    naive ones, which the code would otherwise have to fix wherever it compares a stamp with
    ``utcnow()``. Values written are converted to UTC (naive ones are taken as UTC). The
    column type underneath is ``DateTime(timezone=True)``, as the migrations declare it.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # Naive values are UTC (Optuna's stamps): said explicitly, not left to the session's
        # time zone, which Postgres would otherwise apply.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "seqtune_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class Dataset(Base):
    __tablename__ = "seqtune_datasets"
    # Names are unique per tenant: a study may name its data by it (migration 0007).
    __table_args__ = (
        Index(None, "tenant", "created_at"),
        Index(None, "tenant", "name", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Model(Base):
    """An uploaded model checkpoint (a file GET .../model served), which a study may start its
    trials from (``init_from: {model: ID}``). ``meta`` is what the checkpoint says of itself:
    its model's shape, task, features and lineage."""

    __tablename__ = "seqtune_models"
    __table_args__ = (Index(None, "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(JsonType)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Study(Base):
    __tablename__ = "seqtune_studies"
    __table_args__ = (
        UniqueConstraint("tenant", "name"),
        Index(None, "tenant", "status", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    optuna_study_name: Mapped[str] = mapped_column(String(256), unique=True)
    optuna_study_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    directions: Mapped[list[str]] = mapped_column(JsonType)
    n_trials: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    dataset_id: Mapped[str | None] = mapped_column(
        String(32),
        ForeignKey("seqtune_datasets.id", ondelete="RESTRICT"),
        nullable=True,
        index=True,
    )
    # Counters kept in step with trial transitions, so reading a study never counts its trials.
    n_waiting: Mapped[int] = mapped_column(Integer, default=0)
    n_running: Mapped[int] = mapped_column(Integer, default=0)
    n_complete: Mapped[int] = mapped_column(Integer, default=0)
    n_pruned: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    # The budget: trials ever started. Exactly n_trials are claimed, whatever the workers.
    n_claimed: Mapped[int] = mapped_column(Integer, default=0)
    # Leases taken from dead attempts (each freed or failed-as-lost trial), for /metrics.
    n_reaped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Suggestions asked ahead and not yet claimed (``service.store.buffer``). Each holds a
    # budget slot: n_claimed + n_waiting + n_buffered never exceeds n_trials.
    n_buffered: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Copies of spec fields the claim and reap statements filter on.
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lease_timeout_s: Mapped[float] = mapped_column(Float, default=300.0)
    max_retries: Mapped[int] = mapped_column(Integer, default=2)
    deadline: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_served_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # Classical baselines, computed once per study by the first worker that claims one of its
    # trials (service.store.baselines): NULL until claimed, then {"status": "computing" | "done" |
    # "failed", ...}.
    baselines: Mapped[dict[str, Any] | None] = mapped_column(NullableJsonType, nullable=True)
    # 'search' while sampling; 'final' once the top configurations are re-trained with seeds.
    phase: Mapped[str] = mapped_column(String(16), default="search", server_default="search")
    # Automatic stopping (spec budget.stop_when): the best value so far and the finished trials
    # since it last improved by more than min_delta; why the study stopped early, if it did.
    stop_best: Mapped[float | None] = mapped_column(Float, nullable=True)
    stop_stale: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class Trial(Base):
    """seqtune's record of an Optuna trial: what Optuna holds plus curves, reason, worker."""

    __tablename__ = "seqtune_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number"),
        # Serves GET /best (ORDER BY value LIMIT 1) and state-filtered listings without a scan.
        Index(None, "study_id", "state", "value"),
        # Serves the reaper and the resume claim: running trials by lease age.
        Index(None, "state", "lease_renewed_at"),
        # Optuna's trial ids are unique in its storage; claims look rows up by it after ask().
        Index(None, "optuna_trial_id", unique=True),
        # Serves GET /best's final-phase summary: a study's re-train trials without a scan.
        Index(None, "study_id", "final_of"),
        # Serves the buffer's recent claim rate (trials started in the last seconds).
        Index(None, "study_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    study_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("seqtune_studies.id", ondelete="CASCADE")
    )
    number: Mapped[int] = mapped_column(Integer)
    optuna_trial_id: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    values: Mapped[list[float] | None] = mapped_column(JsonType, nullable=True)
    on_front: Mapped[bool] = mapped_column(Boolean, default=False)
    # Constraints (spec constraints): whether the trial met them; NULL when the study has none
    # or the trial never got that far. An infeasible trial is never best nor on the front.
    feasible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    curve: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    epochs: Mapped[int] = mapped_column(Integer, default=0)
    test_metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    info: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Final phase: the number of the search trial whose hyperparameters this trial re-trains
    # with another seed; NULL for search trials. Re-trains never count as the study's best.
    final_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The lease: the attempt that owns a RUNNING trial, fenced by a number every steal bumps.
    # RUNNING with no owner = waiting for a worker to resume it (after a lost lease or SIGTERM).
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fence: Mapped[int] = mapped_column(Integer, default=0)
    lease_renewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class Checkpoint(Base):
    """A trial's latest resumable snapshot ('resume') and its best model ('best'), in the
    database so that any worker on any machine can resume or serve them."""

    __tablename__ = "seqtune_checkpoints"

    trial_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("seqtune_trials.id", ondelete="CASCADE"),
        primary_key=True,
    )
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Worker(Base):
    """One worker slot process: registered at start, heartbeating while alive."""

    __tablename__ = "seqtune_workers"
    __table_args__ = (Index(None, "heartbeat_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(256))
    slot: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    versions: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    trial_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("seqtune_trials.id", ondelete="SET NULL"),
        nullable=True,
    )
    trials_done: Mapped[int] = mapped_column(Integer, default=0)


class Suggestion(Base):
    """A trial asked of Optuna ahead of any claim (``service.store.buffer``): RUNNING in
    Optuna, so samplers see it as running, and not yet a seqtune trial. A claim turns it into
    one; a pause, a stop or a lower budget cancels it."""

    __tablename__ = "seqtune_suggestions"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    study_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("seqtune_studies.id", ondelete="CASCADE"), index=True
    )
    optuna_trial_id: Mapped[int] = mapped_column(Integer, unique=True)
    number: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

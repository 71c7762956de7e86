"""fleet: leases, claims, workers, checkpoints

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 11:15:29.191994
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seqtune_checkpoints",
        sa.Column("trial_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["seqtune_trials.id"],
            name=op.f("fk_seqtune_checkpoints_trial_id_seqtune_trials"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trial_id", "kind", name=op.f("pk_seqtune_checkpoints")),
    )
    op.create_table(
        "seqtune_workers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=256), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column(
            "versions",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trial_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("trials_done", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["seqtune_trials.id"],
            name=op.f("fk_seqtune_workers_trial_id_seqtune_trials"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_workers")),
    )
    op.create_index(
        op.f("ix_seqtune_workers_heartbeat_at"), "seqtune_workers", ["heartbeat_at"], unique=False
    )
    op.add_column(
        "seqtune_studies", sa.Column("n_claimed", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("seqtune_studies", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column(
        "seqtune_studies",
        sa.Column("lease_timeout_s", sa.Float(), nullable=False, server_default="300"),
    )
    op.add_column(
        "seqtune_studies",
        sa.Column("max_retries", sa.Integer(), nullable=False, server_default="2"),
    )
    op.add_column(
        "seqtune_studies", sa.Column("deadline", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "seqtune_studies", sa.Column("last_served_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("seqtune_trials", sa.Column("lease_owner", sa.String(length=64), nullable=True))
    op.add_column(
        "seqtune_trials", sa.Column("fence", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column(
        "seqtune_trials", sa.Column("lease_renewed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        op.f("ix_seqtune_trials_state_lease_renewed_at"),
        "seqtune_trials",
        ["state", "lease_renewed_at"],
        unique=False,
    )
    # A unique index, not a constraint: SQLite cannot ALTER a constraint onto a table.
    op.create_index(
        op.f("ix_seqtune_trials_optuna_trial_id"),
        "seqtune_trials",
        ["optuna_trial_id"],
        unique=True,
    )
    # Studies made before this revision: every trial seen so far took a budget slot.
    op.execute(
        "UPDATE seqtune_studies SET n_claimed = n_running + n_complete + n_pruned + n_failed"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_seqtune_trials_optuna_trial_id"), table_name="seqtune_trials")
    op.drop_index(op.f("ix_seqtune_trials_state_lease_renewed_at"), table_name="seqtune_trials")
    op.drop_column("seqtune_trials", "lease_renewed_at")
    op.drop_column("seqtune_trials", "fence")
    op.drop_column("seqtune_trials", "lease_owner")
    op.drop_column("seqtune_studies", "last_served_at")
    op.drop_column("seqtune_studies", "deadline")
    op.drop_column("seqtune_studies", "max_retries")
    op.drop_column("seqtune_studies", "lease_timeout_s")
    op.drop_column("seqtune_studies", "max_concurrent")
    op.drop_column("seqtune_studies", "n_claimed")
    op.drop_index(op.f("ix_seqtune_workers_heartbeat_at"), table_name="seqtune_workers")
    op.drop_table("seqtune_workers")
    op.drop_table("seqtune_checkpoints")

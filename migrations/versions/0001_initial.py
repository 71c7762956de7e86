"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21 10:51:15.458953
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seqtune_api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_seqtune_api_keys_key_hash")),
    )
    op.create_index(
        op.f("ix_seqtune_api_keys_tenant"), "seqtune_api_keys", ["tenant"], unique=False
    )
    op.create_table(
        "seqtune_datasets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column(
            "columns",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_datasets")),
    )
    op.create_index(
        op.f("ix_seqtune_datasets_tenant_created_at"),
        "seqtune_datasets",
        ["tenant", "created_at"],
        unique=False,
    )
    op.create_table(
        "seqtune_studies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("optuna_study_name", sa.String(length=256), nullable=False),
        sa.Column("optuna_study_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("task", sa.String(length=16), nullable=False),
        sa.Column(
            "spec",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "directions",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.String(length=32), nullable=True),
        sa.Column("n_waiting", sa.Integer(), nullable=False),
        sa.Column("n_running", sa.Integer(), nullable=False),
        sa.Column("n_complete", sa.Integer(), nullable=False),
        sa.Column("n_pruned", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["seqtune_datasets.id"],
            name=op.f("fk_seqtune_studies_dataset_id_seqtune_datasets"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_studies")),
        sa.UniqueConstraint("optuna_study_name", name=op.f("uq_seqtune_studies_optuna_study_name")),
        sa.UniqueConstraint("tenant", "name", name=op.f("uq_seqtune_studies_tenant_name")),
    )
    op.create_index(
        op.f("ix_seqtune_studies_dataset_id"), "seqtune_studies", ["dataset_id"], unique=False
    )
    op.create_index(
        op.f("ix_seqtune_studies_tenant_status_id"),
        "seqtune_studies",
        ["tenant", "status", "id"],
        unique=False,
    )
    op.create_table(
        "seqtune_trials",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("optuna_trial_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column(
            "values",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("on_front", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column(
            "curve",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.Column(
            "test_metrics",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "info",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["seqtune_studies.id"],
            name=op.f("fk_seqtune_trials_study_id_seqtune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_trials")),
        sa.UniqueConstraint("study_id", "number", name=op.f("uq_seqtune_trials_study_id_number")),
    )
    op.create_index(
        op.f("ix_seqtune_trials_study_id_state_value"),
        "seqtune_trials",
        ["study_id", "state", "value"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_seqtune_trials_study_id_state_value"), table_name="seqtune_trials")
    op.drop_table("seqtune_trials")
    op.drop_index(op.f("ix_seqtune_studies_tenant_status_id"), table_name="seqtune_studies")
    op.drop_index(op.f("ix_seqtune_studies_dataset_id"), table_name="seqtune_studies")
    op.drop_table("seqtune_studies")
    op.drop_index(op.f("ix_seqtune_datasets_tenant_created_at"), table_name="seqtune_datasets")
    op.drop_table("seqtune_datasets")
    op.drop_index(op.f("ix_seqtune_api_keys_tenant"), table_name="seqtune_api_keys")
    op.drop_table("seqtune_api_keys")

"""suggestion buffer: trials asked ahead of claims, per study

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 14:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "seqtune_studies",
        sa.Column("n_buffered", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_table(
        "seqtune_suggestions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("optuna_trial_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["seqtune_studies.id"],
            name=op.f("fk_seqtune_suggestions_study_id_seqtune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_suggestions")),
        sa.UniqueConstraint("optuna_trial_id", name=op.f("uq_seqtune_suggestions_optuna_trial_id")),
    )
    op.create_index(
        op.f("ix_seqtune_suggestions_study_id"), "seqtune_suggestions", ["study_id"], unique=False
    )
    op.create_index(
        op.f("ix_seqtune_trials_study_id_started_at"),
        "seqtune_trials",
        ["study_id", "started_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_seqtune_trials_study_id_started_at"), table_name="seqtune_trials")
    op.drop_index(op.f("ix_seqtune_suggestions_study_id"), table_name="seqtune_suggestions")
    op.drop_table("seqtune_suggestions")
    op.drop_column("seqtune_studies", "n_buffered")

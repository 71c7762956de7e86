"""baselines and final phase: classical baselines per study, the study's phase, re-train trials

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 10:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "seqtune_studies",
        sa.Column(
            "baselines",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
    )
    op.add_column(
        "seqtune_studies",
        sa.Column("phase", sa.String(length=16), nullable=False, server_default="search"),
    )
    op.add_column("seqtune_trials", sa.Column("final_of", sa.Integer(), nullable=True))
    op.create_index(
        op.f("ix_seqtune_trials_study_id_final_of"),
        "seqtune_trials",
        ["study_id", "final_of"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_seqtune_trials_study_id_final_of"), table_name="seqtune_trials")
    op.drop_column("seqtune_trials", "final_of")
    op.drop_column("seqtune_studies", "phase")
    op.drop_column("seqtune_studies", "baselines")

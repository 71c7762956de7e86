"""search power: automatic stopping, constraints, uploaded models for fine-tuning

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("seqtune_studies", sa.Column("stop_best", sa.Float(), nullable=True))
    op.add_column(
        "seqtune_studies",
        sa.Column("stop_stale", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("seqtune_studies", sa.Column("stop_reason", sa.Text(), nullable=True))
    op.add_column("seqtune_trials", sa.Column("feasible", sa.Boolean(), nullable=True))
    op.create_table(
        "seqtune_models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "meta",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seqtune_models")),
    )
    op.create_index(
        op.f("ix_seqtune_models_tenant_created_at"),
        "seqtune_models",
        ["tenant", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_seqtune_models_tenant_created_at"), table_name="seqtune_models")
    op.drop_table("seqtune_models")
    op.drop_column("seqtune_trials", "feasible")
    op.drop_column("seqtune_studies", "stop_reason")
    op.drop_column("seqtune_studies", "stop_stale")
    op.drop_column("seqtune_studies", "stop_best")

"""reap counter: leases taken from dead attempts, per study (for /metrics)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 14:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "seqtune_studies", sa.Column("n_reaped", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    op.drop_column("seqtune_studies", "n_reaped")

"""dataset names: unique per tenant, so that a study may reference an upload by its name

Existing duplicates are renamed first: the oldest upload of a name keeps it, later ones become
``name-2``, ``name-3``, ... (the first of these free for the tenant).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_MAX_NAME = 128  # seqtune_datasets.name is String(128)


def _free_name(name: str, taken: set[str]) -> str:
    """``name-2``, ``name-3``, ...: the first not in ``taken``, cut to fit the column."""
    k = 2
    while True:
        suffix = f"-{k}"
        candidate = name[: _MAX_NAME - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        k += 1


def upgrade() -> None:
    conn = op.get_bind()
    datasets = sa.table(
        "seqtune_datasets",
        sa.column("id", sa.String),
        sa.column("tenant", sa.String),
        sa.column("name", sa.String),
        sa.column("created_at", sa.DateTime),
    )
    # Metadata only (never the content): a few rows per tenant.
    rows = conn.execute(
        sa.select(datasets.c.id, datasets.c.tenant, datasets.c.name).order_by(
            datasets.c.tenant, datasets.c.created_at, datasets.c.id
        )
    ).all()
    taken: dict[str, set[str]] = {}
    for _, tenant, name in rows:
        taken.setdefault(tenant, set()).add(name)
    seen: dict[str, set[str]] = {}
    for id_, tenant, name in rows:
        kept = seen.setdefault(tenant, set())
        if name not in kept:
            kept.add(name)
            continue
        new = _free_name(name, taken[tenant])
        taken[tenant].add(new)
        kept.add(new)
        conn.execute(sa.update(datasets).where(datasets.c.id == id_).values(name=new))
    op.create_index(
        op.f("ix_seqtune_datasets_tenant_name"),
        "seqtune_datasets",
        ["tenant", "name"],
        unique=True,
    )


def downgrade() -> None:
    # The renamed duplicates keep their new names.
    op.drop_index(op.f("ix_seqtune_datasets_tenant_name"), table_name="seqtune_datasets")

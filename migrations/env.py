"""Alembic environment. Run through ``service.store.migrate``, which hands over a live connection.

Optuna keeps its own Alembic history in the default ``alembic_version`` table; ours lives in
``seqtune_alembic_version`` and autogenerate only ever looks at ``seqtune_*`` tables.
"""

from __future__ import annotations

from alembic import context

from service.store.migrate import VERSION_TABLE, include_name
from service.store.tables import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - we never run alembic's CLI without a connection
    raise RuntimeError("run migrations with `seqtune db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_name=include_name,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

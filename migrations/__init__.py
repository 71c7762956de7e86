"""Alembic migrations of seqtune's own tables (version table: seqtune_alembic_version)."""

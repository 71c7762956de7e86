"""Migrations produce exactly the models' schema and never touch Optuna's tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import optuna
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from service.store import migrate
from service.store.tables import Base
from tests.conftest import ADMIN_URL, _admin


@pytest.fixture
def empty_url(pg_template: str) -> Iterator[str]:
    admin = _admin()
    name = f"seqtune_e_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _diff(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_name": migrate.include_name, "compare_type": True}
        )
        return compare_metadata(ctx, Base.metadata)


@pytest.mark.parametrize("optuna_first", [False, True])
def test_migrations_match_models_beside_optuna(empty_url: str, optuna_first: bool) -> None:
    engine = create_engine(empty_url)
    if optuna_first:
        optuna.storages.RDBStorage(empty_url).engine.dispose()
    migrate.upgrade(engine)
    if not optuna_first:
        optuna.storages.RDBStorage(empty_url).engine.dispose()
    assert _diff(engine) == []
    tables = set(inspect(engine).get_table_names())
    ours = {t for t in tables if t.startswith("seqtune_")}
    assert ours == {
        "seqtune_api_keys",
        "seqtune_datasets",
        "seqtune_studies",
        "seqtune_trials",
        "seqtune_checkpoints",
        "seqtune_workers",
        "seqtune_suggestions",
        "seqtune_models",
        "seqtune_alembic_version",
    }
    assert {"studies", "trials", "alembic_version"} <= tables  # Optuna's, untouched
    assert migrate.current_revision(engine) == migrate.head_revision()
    with engine.connect() as c:
        optuna_rev = c.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert optuna_rev is not None and optuna_rev != migrate.head_revision()
    # Optuna still opens its storage after our migrations (its version check passes).
    optuna.create_study(study_name="plain", storage=empty_url)
    engine.dispose()


def test_downgrade_removes_only_ours_and_upgrade_is_idempotent(empty_url: str) -> None:
    engine = create_engine(empty_url)
    optuna.storages.RDBStorage(empty_url).engine.dispose()
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # a second run (another replica starting) is a no-op
    migrate.downgrade(engine, "base")
    tables = set(inspect(engine).get_table_names())
    assert not {t for t in tables if t.startswith("seqtune_") and t != "seqtune_alembic_version"}
    assert {"studies", "trials"} <= tables
    migrate.upgrade(engine)
    assert _diff(engine) == []
    engine.dispose()

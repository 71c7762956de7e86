"""The GPU tests (marker ``gpu``): they run where torch sees a CUDA device and are skipped
elsewhere, at collection, without touching the device.

They need no Postgres. The engine tests touch no database; the slot tests run a real slot
against seqtune's embedded default, an SQLite file in the test's own folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.settings import Settings
from service.store import migrate
from service.store.db import Database


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings on a fresh, migrated SQLite file (the embedded default) in ``tmp_path``."""
    s = Settings(
        database_url=f"sqlite:///{tmp_path / 'seqtune.db'}",
        data_dir=tmp_path,
        auth_enabled=False,
        db_retry_backoff_s=0.05,
    )
    db = Database(s)
    migrate.upgrade(db.engine, settings=s)
    db.dispose()
    yield s

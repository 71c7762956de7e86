"""The slot tests' helpers: studies on the SQLite store, their trials, a slot on the GPU."""

from __future__ import annotations

import signal
from typing import Any

from sqlalchemy import select

from seqtune.spec import check_spec, parse_spec
from service.settings import Settings
from service.store import studies
from service.store.db import Database
from service.store.optuna import make_storage
from service.store.tables import Study, Trial


def create_study(settings: Settings, name: str, body: dict[str, Any]) -> None:
    spec = parse_spec({**body, "name": name})
    check_spec(spec)
    db = Database(settings)
    try:
        studies.create_study(db, make_storage(settings), tenant="default", spec=spec)
    finally:
        db.dispose()


def trials_of(settings: Settings, name: str) -> list[Trial]:
    db = Database(settings)
    try:
        return db.run(
            lambda s: list(
                s.scalars(
                    select(Trial).join(Study).where(Study.name == name).order_by(Trial.number)
                )
            )
        )
    finally:
        db.dispose()


def run_slot(settings: Settings, **config: Any) -> int:
    """A real slot on the GPU in this process, until no study has work (``burst``); the
    signal handlers it installs are put back. Returns the number of trials it ran."""
    from worker import slot as slot_mod

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        cfg = slot_mod.SlotConfig(device="cuda", burst=True, **config)
        return slot_mod.Slot(cfg, settings).run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)

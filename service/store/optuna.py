"""Optuna objects made from a study spec: storage, sampler, pruner, distributions.

The service and the workers both build their Optuna objects here, so a study behaves the same
wherever it is driven from.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from seqtune import search
from seqtune.spec import Categorical, FloatRange, IntRange, PrunerSpec, StudySpec
from service.settings import Settings
from service.store.db import engine_kwargs

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(settings: Settings) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on seqtune's database, with the same pool, pre-ping settings and
    session limits (``service.store.db.session_limits``): Optuna's connection holds locks too (on
    its trial rows while a worker reports or tells), so a frozen worker's Optuna session must
    be ended by the server like ours. RDBStorage passes ``engine_kwargs`` to create_engine."""
    return _cached_storage(settings.url, tuple(sorted(_hashable(engine_kwargs(settings)))))


def _hashable(d: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in d.items()]


@lru_cache(maxsize=8)
def _cached_storage(url: str, kwargs: tuple[tuple[str, Any], ...]) -> optuna.storages.RDBStorage:
    engine_kw = {k: dict(v) if isinstance(v, tuple) else v for k, v in kwargs}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kw)


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions."""
    out: dict[str, BaseDistribution] = {}
    for name, d in spec.search_space.items():
        if isinstance(d, IntRange):
            out[name] = IntDistribution(d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, FloatRange):
            out[name] = FloatDistribution(d.low, d.high, log=d.log, step=d.step)
        else:
            assert isinstance(d, Categorical)
            out[name] = CategoricalDistribution(d.choices)
    return out


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's sampler, from the one table (``seqtune.search.SAMPLERS``)."""
    return search.make_sampler(spec)


def make_pruner(p: PrunerSpec) -> optuna.pruners.BasePruner:
    """The study's pruner, from the one table (``seqtune.search.PRUNERS``)."""
    return search.make_pruner(p)

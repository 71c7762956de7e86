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

from seqtune.spec import Categorical, FloatRange, IntRange, PrunerSpec, StudySpec, grid_values
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
    s = spec.sampler
    opts: dict[str, Any] = {k: v for k, v in s.options.items() if v is not None}
    if s.name == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, **opts)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.name == "grid":
        grid = {name: grid_values(d) for name, d in spec.search_space.items()}
        return optuna.samplers.GridSampler(grid, seed=s.seed)  # type: ignore[arg-type]
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False, **opts)
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, warn_independent_sampling=False, **opts)
    if s.name == "qmc":
        return optuna.samplers.QMCSampler(seed=s.seed, warn_independent_sampling=False, **opts)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, **opts)
    raise AssertionError(s.name)


def make_pruner(p: PrunerSpec) -> optuna.pruners.BasePruner:
    opts: dict[str, Any] = {k: v for k, v in p.options.items() if v is not None}
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "median":
        return optuna.pruners.MedianPruner(**opts)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(**opts)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**opts)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(**opts)
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(**opts)
    if p.name == "patient":
        wrapped = make_pruner(p.wrapped) if p.wrapped is not None else None
        return optuna.pruners.PatientPruner(wrapped, **opts)
    if p.name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(**opts)
    raise AssertionError(p.name)

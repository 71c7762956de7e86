"""Optuna objects made from a study spec: storage, sampler, pruner, distributions, and the
per-process cache of Optuna study objects.

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
from optuna.trial import TrialState as OptunaState

from seqtune import search
from seqtune.spec import Categorical, FloatRange, IntRange, PrunerSpec, StudySpec
from service.settings import Settings
from service.store.db import engine_kwargs

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Optuna system attribute on every trial seqtune's claim asks: the owner that asked it.
ASKED_BY = "seqtune_asked_by"


def make_storage(settings: Settings) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on seqtune's database, with the same pool, pre-ping settings and
    session limits (``service.store.db.session_limits``): Optuna's connection holds locks too (on
    its trial rows while a worker reports or tells), so a frozen worker's Optuna session must
    be ended by the server like ours. RDBStorage passes ``engine_kwargs`` to create_engine.
    It connects to ``Settings.optuna_url``: the same database, by a route of its own behind
    PgBouncer (a pool that seqtune's held transactions cannot exhaust)."""
    return _cached_storage(settings.optuna_url, tuple(sorted(_hashable(engine_kwargs(settings)))))


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


_STUDIES: dict[tuple[int, str], optuna.Study] = {}


def optuna_study(
    storage: optuna.storages.BaseStorage, optuna_name: str, spec: StudySpec, seed_offset: int = 0
) -> optuna.Study:
    """The Optuna study with the spec's sampler and pruner, cached per process (loading costs
    queries; a study's name, directions and spec never change). The sampler is made afresh,
    seeded per budget slot: samplers sharing one seed in many processes would propose the
    same points, and a fresh one per slot keeps a seeded study reproducible."""
    study = _cached_study(storage, optuna_name, spec)
    study.sampler = make_sampler(_seeded(spec, seed_offset))
    return study


def _cached_study(
    storage: optuna.storages.BaseStorage, optuna_name: str, spec: StudySpec
) -> optuna.Study:
    key = (id(storage), optuna_name)
    study = _STUDIES.get(key)
    if study is None:
        study = optuna.load_study(
            study_name=optuna_name, storage=storage, pruner=make_pruner(spec.pruner)
        )
        # Optuna wraps the storage in a cache of the study's finished trials, read in full the
        # first time (seconds at 10^4 trials); do it now, not later inside ask() under the
        # study lock. Every Study object made from the same storage keeps its own cache: the
        # cached Study's is the one to share (``asking_study``).
        study.get_trials(deepcopy=False, states=(OptunaState.WAITING,))
        if len(_STUDIES) > 256:
            _STUDIES.clear()
        _STUDIES[key] = study
    return study


def asking_study(
    storage: optuna.storages.BaseStorage, optuna_name: str, spec: StudySpec, seed_offset: int
) -> optuna.Study:
    """An Optuna study object of its own (not ``optuna_study``'s cached one), with the spec's
    sampler seeded for ``seed_offset``: for asks made beside the thread that uses the cached
    object (a worker's suggestion refill), which would otherwise swap the sampler under them.
    It shares the cached object's storage, and so its cache of the study's trials (a Study
    made on the plain storage would read all of them again: a second per ask at 10^4)."""
    return optuna.Study(
        study_name=optuna_name,
        storage=_cached_study(storage, optuna_name, spec)._storage,
        sampler=make_sampler(_seeded(spec, seed_offset)),
        pruner=make_pruner(spec.pruner),
    )


def _seeded(spec: StudySpec, seed_offset: int) -> StudySpec:
    """The spec with its sampler's seed moved by ``seed_offset`` (unseeded: unchanged)."""
    sampler_spec = spec.sampler
    # A grid sampler's seed shuffles its grid, and a trial's grid_id indexes that order: every
    # process must shuffle alike, or two slots suggest one point under different grid_ids.
    if sampler_spec.seed is None or search.SAMPLERS[sampler_spec.name].grid:
        return spec
    seed = (sampler_spec.seed + seed_offset) % 2**32
    return spec.model_copy(update={"sampler": sampler_spec.model_copy(update={"seed": seed})})


def ask_marked(
    storage: optuna.storages.BaseStorage,
    ostudy: optuna.Study,
    spec: StudySpec,
    owner: str,
) -> optuna.Trial:
    """``ostudy.ask()`` and the study's parameters suggested define-by-run, with the trial
    marked as seqtune's (``ASKED_BY``) right after Optuna creates or pops it and before the
    sampler runs, so that the window in which a dying claim leaves an unmarked trial is one
    write wide. Parameters are suggested parents first (``StudySpec.search_order``); a
    conditional one only when its condition holds on the values suggested so far, so an
    inactive parameter is absent from the trial (enqueued values honoured, as by ask())."""
    trial = ostudy.ask()
    storage.set_trial_system_attr(trial._trial_id, ASKED_BY, owner)
    dists = distributions(spec)
    for name in spec.search_order():
        if not spec.active(trial.params).get(name, True):
            continue
        dist = dists[name]
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            assert isinstance(dist, CategoricalDistribution)
            trial.suggest_categorical(name, dist.choices)
    return trial

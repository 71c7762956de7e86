"""Optuna objects made from a study spec: storage, sampler, pruner, distributions, and the
per-process cache of Optuna study objects.

The service and the workers both build their Optuna objects here, so a study behaves the same
wherever it is driven from.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Container, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
from sqlalchemy import text
from sqlalchemy.orm import Session

from seqtune import search
from seqtune.spec import Categorical, FloatRange, IntRange, PrunerSpec, StudySpec
from service.settings import Settings
from service.store.db import engine_kwargs
from service.store.known import known_trials

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


def warm_study(storage: optuna.storages.BaseStorage, optuna_name: str, spec: StudySpec) -> int:
    """Load the study's Optuna object into this process's cache (``optuna_study``), before
    taking a lock under which it would otherwise load (seconds at 10^4 trials). Returns the
    Optuna study's id."""
    return _cached_study(storage, optuna_name, spec)._study_id


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
    object, which would otherwise swap the sampler under them, and for each suggestion of a
    batch. A copy of the cached object: it shares its storage, and so its cache of the
    study's trials (a Study made on the plain storage would read all of them again: a second
    per ask at 10^4), and costs no query (``optuna.Study()`` looks the study up)."""
    study = copy.copy(_cached_study(storage, optuna_name, spec))
    study.sampler = make_sampler(_seeded(spec, seed_offset))
    study.pruner = make_pruner(spec.pruner)
    return study


def _seeded(spec: StudySpec, seed_offset: int) -> StudySpec:
    """The spec with its sampler's seed moved by ``seed_offset`` (unseeded: unchanged)."""
    sampler_spec = spec.sampler
    # A grid sampler's seed shuffles its grid, and a trial's grid_id indexes that order: every
    # process must shuffle alike, or two slots suggest one point under different grid_ids.
    if sampler_spec.seed is None or search.SAMPLERS[sampler_spec.name].grid:
        return spec
    seed = (sampler_spec.seed + seed_offset) % 2**32
    return spec.model_copy(update={"sampler": sampler_spec.model_copy(update={"seed": seed})})


@dataclass(frozen=True)
class Asked:
    """A trial seqtune asked of Optuna: its Optuna id, number and (external) parameters."""

    trial_id: int
    number: int
    params: dict[str, Any]


def ask_marked(
    storage: optuna.storages.BaseStorage,
    ostudy: optuna.Study,
    spec: StudySpec,
    owner: str,
) -> Asked:
    """``ostudy.ask()`` and the study's parameters suggested define-by-run, with the trial
    marked as seqtune's (``ASKED_BY``) right after Optuna creates or pops it and before the
    sampler runs, so that the window in which a dying claim leaves an unmarked trial is one
    write wide. Parameters are suggested parents first (``StudySpec.search_order``); a
    conditional one only when its condition holds on the values suggested so far, so an
    inactive parameter is absent from the trial (enqueued values honoured, as by ask()).
    On Postgres, a trial with no WAITING trial to pop is sketched instead (``sketch``)."""
    trial = ostudy.ask()
    storage.set_trial_system_attr(trial._trial_id, ASKED_BY, owner)
    _suggest_all(trial, spec)
    return Asked(trial._trial_id, trial.number, dict(trial.params))


def sketch(
    storage: optuna.storages.BaseStorage,
    ostudy: optuna.Study,
    spec: StudySpec,
    owner: str,
    siblings: Sequence[Sketch] = (),
    known: list[FrozenTrial] | None = None,
) -> Sketch | None:
    """A new trial of ``ostudy`` sampled as ``ask_marked`` samples it, but not yet written:
    Optuna's own ``Trial`` and the study's sampler run against a storage (``Sketch``) that
    reads the study from ``storage`` and keeps the new trial in memory. The caller writes it
    (``Sketch.write``) in the transaction that takes its budget slot, so a claim that loses
    its slot, or dies, leaves nothing in Optuna. None when Optuna holds a
    WAITING trial (enqueued: a queued trial, a final-phase retrain, an outside client's),
    which ``ask_marked`` pops, as ``ask()`` would. ``siblings``: trials sketched before it
    in the same transaction (not yet visible to Optuna's connection), which the sampler sees
    as RUNNING trials too, as it would see them asked. ``known``: the study's trials as read
    by the caller (``service.store.known.known_trials``, on its transaction's connection);
    by default they are read on Optuna's.

    Why: ``ask()`` writes a trial in five of Optuna's transactions and about 23 statements
    (create, re-read, mark, one per parameter), all under the study's ask lock; on a loaded
    database that was what limited claims (bench/coordination.py). A sketch is written in two
    statements inside the caller's transaction."""
    # The study's trials as the sampler sees them, read in one statement and cached per
    # process (``service.store.known``).
    # Siblings share the first one's read of the study (one read per batch: the batch is
    # sampled under the ask lock, so no other ask adds a trial meanwhile).
    reads = ostudy._storage
    if siblings:
        known = siblings[0].known
    else:
        if known is None:
            rdb: Any = getattr(reads, "_backend", reads)
            engine = rdb.engine
            with engine.connect() as conn:
                known = known_trials(conn, ostudy._study_id)
        if any(t.state == OptunaState.WAITING for t in known):
            return None
    sk = Sketch(
        reads,
        ostudy._study_id,
        number=len(known) + len(siblings),
        owner=owner,
        known=known,
        siblings=[x.trial for x in siblings],
        study_name=ostudy.study_name,
    )
    sketched = copy.copy(ostudy)  # the same sampler and pruner, reading through the sketch
    sketched._storage = sk
    _suggest_all(optuna.Trial(sketched, Sketch.ID), spec)
    return sk


_LOCK_OPTUNA_STUDY = text("SELECT study_id FROM studies WHERE study_id = :sid FOR UPDATE")
# The rows ``RDBStorage.create_new_trial`` writes, for every record of ``:trials``
# (``sketch_rows``), numbered after the study's trials; ``{gate}``: a relation the trials'
# INSERT joins (one row: write them; none: write nothing), ``{more}``: further CTEs on ``j``.
WRITE_TRIALS_SQL = """
WITH {gate_cte} base AS (
    SELECT count(*) AS n FROM trials WHERE study_id = :sid
), src AS (
    SELECT * FROM jsonb_to_recordset(CAST(:trials AS jsonb))
        AS x(i int, start timestamp, params jsonb, attrs jsonb, ext jsonb)
), tr AS (
    INSERT INTO trials (number, study_id, state, datetime_start)
    SELECT base.n + src.i, :sid, CAST('RUNNING' AS trialstate), src.start
    FROM src, base {gate} ORDER BY src.i
    RETURNING trial_id, number
), j AS (
    SELECT tr.trial_id, tr.number, src.i, src.params, src.attrs, src.ext
    FROM tr, base, src WHERE tr.number = base.n + src.i
), params AS (
    INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
    SELECT j.trial_id, p.name, p.value, p.dist
    FROM j, jsonb_to_recordset(j.params) AS p(name text, value float8, dist text)
), sys AS (
    INSERT INTO trial_system_attributes (trial_id, key, value_json)
    SELECT j.trial_id, a.key, a.value
    FROM j, jsonb_to_recordset(j.attrs) AS a(key text, value text, "user" bool)
    WHERE NOT a."user"
), usr AS (
    INSERT INTO trial_user_attributes (trial_id, key, value_json)
    SELECT j.trial_id, a.key, a.value
    FROM j, jsonb_to_recordset(j.attrs) AS a(key text, value text, "user" bool)
    WHERE a."user"
){more}
"""
_WRITE_TRIALS = text(
    WRITE_TRIALS_SQL.format(gate_cte="", gate="", more="")
    + "SELECT trial_id, number FROM j ORDER BY i"
)


def write_sketches(s: Session, study_id: int, sketches: Sequence[Sketch]) -> list[Asked]:
    """Write ``sketches`` (of the Optuna study ``study_id``, in order) into Optuna's tables in
    ``s``'s transaction, in two statements however many there are (Postgres; Optuna's
    storage is seqtune's database by design, ``Settings.optuna_database_url``): the rows
    ``RDBStorage.create_new_trial`` writes for a template trial, numbered as it numbers them,
    under the same lock (the study's row in ``studies``), which is taken first, in a statement
    of its own, so that the count sees every trial committed before it."""
    if not sketches:
        return []
    s.execute(_LOCK_OPTUNA_STUDY, {"sid": study_id})
    got = s.execute(_WRITE_TRIALS, {"sid": study_id, "trials": sketch_rows(sketches)}).all()
    return [
        Asked(r.trial_id, r.number, dict(sk.trial.params))
        for r, sk in zip(got, sketches, strict=True)
    ]


def lock_optuna_study(s: Session, study_id: int) -> None:
    """Lock the Optuna study's row for the rest of ``s``'s transaction, in a statement of its
    own, as ``RDBStorage.create_new_trial`` does before numbering a trial: the statements after
    it see every trial committed before (``write_sketches``)."""
    s.execute(_LOCK_OPTUNA_STUDY, {"sid": study_id})


def sketch_rows(sketches: Sequence[Sketch]) -> str:
    """``sketches`` as the JSON records ``_WRITE_TRIALS`` reads (``trials``): each one's
    index, start, parameters (internal value and distribution), attributes, and its
    parameters as the trial shows them (``ext``)."""
    rows = [
        {
            "i": i,
            # Optuna stores naive UTC (its DateTime columns convert local to UTC).
            "start": (sk.trial.datetime_start or datetime.now())
            .astimezone(UTC)
            .replace(tzinfo=None)
            .isoformat(),
            "params": [
                {
                    "name": name,
                    "value": dist.to_internal_repr(sk.trial.params[name]),
                    "dist": optuna.distributions.distribution_to_json(dist),
                }
                for name, dist in sk.trial.distributions.items()
            ],
            "attrs": [
                {"key": k, "value": json.dumps(v), "user": False}
                for k, v in sk.trial.system_attrs.items()
            ]
            + [
                {"key": k, "value": json.dumps(v), "user": True}
                for k, v in sk.trial.user_attrs.items()
            ],
            "ext": sk.trial.params,
        }
        for i, sk in enumerate(sketches)
    ]
    return json.dumps(rows)


def _suggest_all(trial: optuna.Trial, spec: StudySpec) -> None:
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


class Sketch(optuna.storages.BaseStorage):
    """Optuna's storage as one ask sees it: the study's trials as read once (``known``) with
    the batch's earlier sketches (``siblings``); every other read and every study-level
    write goes to ``real``; the new trial (id ``ID``) lives in memory, RUNNING, until
    ``write``. It is
    listed among the study's trials, as an asked trial would be, so samplers (TPE's constant
    liar, NSGA-II's generations) see it as they see an asked one; what a sampler stores on
    the trial (its system attributes) is written with it."""

    ID = -1

    def __init__(
        self,
        real: optuna.storages.BaseStorage,
        study_id: int,
        *,
        number: int,
        owner: str,
        known: list[FrozenTrial],
        siblings: Sequence[FrozenTrial] = (),
        study_name: str | None = None,
    ) -> None:
        self.real, self.study_id, self.siblings = real, study_id, list(siblings)
        self.study_name = study_name
        self.known = known  # the study's trials as read when the batch began
        self.trial = FrozenTrial(
            number=number,
            state=OptunaState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={ASKED_BY: owner},
            intermediate_values={},
            trial_id=self.ID,
        )

    def write(self, s: Session) -> Asked:
        """Write the sketched trial into Optuna's tables in ``s``'s transaction
        (``write_sketches``)."""
        return write_sketches(s, self.study_id, [self])[0]

    # The sketched trial.
    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id == self.ID:
            return copy.deepcopy(self.trial)
        return self.real.get_trial(trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[OptunaState] | None = None
    ) -> list[FrozenTrial]:
        if study_id != self.study_id:
            return self.real.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = [
            t
            for t in [*self.known, *self.siblings, self.trial]
            if states is None or t.state in states
        ]
        return copy.deepcopy(trials) if deepcopy else trials

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any
    ) -> None:
        if trial_id != self.ID:
            return self.real.set_trial_param(
                trial_id, param_name, param_value_internal, distribution
            )
        self.trial.params[param_name] = distribution.to_external_repr(param_value_internal)
        self.trial.distributions[param_name] = distribution
        return None

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id != self.ID:
            return self.real.set_trial_system_attr(trial_id, key, value)
        self.trial.system_attrs[key] = value
        return None

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id != self.ID:
            return self.real.set_trial_user_attr(trial_id, key, value)
        self.trial.user_attrs[key] = value
        return None

    def get_trial_number_from_id(self, trial_id: int) -> int:
        if trial_id == self.ID:
            return self.trial.number
        return self.real.get_trial_number_from_id(trial_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        if study_id == self.study_id and trial_number == self.trial.number:
            return self.ID
        return self.real.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        if trial_id == self.ID:
            raise RuntimeError("a sketched trial cannot be told while it is being asked")
        return self.real.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        if trial_id == self.ID:
            raise RuntimeError("a sketched trial cannot report while it is being asked")
        self.real.set_trial_intermediate_value(trial_id, step, intermediate_value)

    # Everything else is the study's, read from and written to Optuna's storage.
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.real.create_new_trial(study_id, template_trial)

    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        return self.real.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.real.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.real.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.real.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        # Hyperband's pruner makes a study object per bracket on every sampling call (four
        # per sketch), and each looks its study up by name: the sketch's own is known.
        if study_name == self.study_name:
            return self.study_id
        return self.real.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.real.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[Any]:
        return self.real.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.real.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.real.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[Any]:
        return self.real.get_all_studies()

"""The samplers and pruners a study may name: one table each, with option schema and constructor.

To add a sampler or a pruner, add one entry to ``_SAMPLERS`` or ``_PRUNERS`` below.

An entry is the whole extension point: the study schema lists its name (``seqtune.spec``),
``check_spec`` validates its options against the schema here, and the service and the workers
build it through ``make_sampler`` / ``make_pruner``. Constructors import optuna inside
themselves, so ``import seqtune.search`` stays light (the base install has no optuna).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # annotations only: never imported at run time by this module's import
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler

    from seqtune.spec import PrunerSpec, StudySpec

OptionType = Literal["int", "float", "bool", "int_or_auto", "str"]


@dataclass(frozen=True)
class Option:
    """One constructor option a study may set: its type, and its inclusive bounds (numbers) or
    allowed values (strings). ``required``: a study naming the entry must give it."""

    type: OptionType
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    required: bool = False


def integer(low: int, high: int, *, required: bool = False) -> Option:
    """An integer option within ``[low, high]``."""
    return Option("int", low, high, required=required)


def integer_or_auto(low: int, high: int) -> Option:
    """An integer option within ``[low, high]``, or the string ``'auto'``."""
    return Option("int_or_auto", low, high)


def real(low: float, high: float, *, required: bool = False) -> Option:
    """A number option within ``[low, high]``."""
    return Option("float", low, high, required=required)


def flag() -> Option:
    """A boolean option."""
    return Option("bool")


def one_of(*choices: str) -> Option:
    """A string option taking one of ``choices``."""
    return Option("str", choices=choices)


@dataclass(frozen=True)
class Sampler:
    """A sampler a study may name.

    ``build(spec, options)`` returns the Optuna sampler for a checked study; ``options`` are the
    study's non-null ``sampler.options`` (the seed is ``spec.sampler.seed``). ``grid``: it
    enumerates the search space, so every dimension must be discrete and the grid bounded.
    ``single_objective``: it cannot drive a study with several objectives. ``constraints``:
    it takes ``constraints_func``, which ``build`` passes when the study has constraints.
    """

    name: str
    options: Mapping[str, Option]
    build: Callable[[StudySpec, dict[str, Any]], BaseSampler]
    grid: bool = False
    single_objective: bool = False
    constraints: bool = False  # takes Optuna's constraints_func (a study's ``constraints``)


@dataclass(frozen=True)
class Pruner:
    """A pruner a study may name.

    ``build(options, wrapped)`` returns the Optuna pruner; ``wrapped`` is the built
    ``PrunerSpec.wrapped`` for an entry that ``wraps`` another pruner, else None. ``check``
    states a rule across options that the per-option schema cannot (the reason, or None).
    """

    name: str
    options: Mapping[str, Option]
    build: Callable[[dict[str, Any], BasePruner | None], BasePruner]
    wraps: bool = False
    check: Callable[[Mapping[str, Any]], str | None] | None = None


# ---- constructors (optuna is imported here, on first use, never at module import) ------------


def _sampler(cls: str, **fixed: Any) -> Callable[[StudySpec, dict[str, Any]], BaseSampler]:
    """The constructor of ``optuna.samplers.<cls>(seed=..., **fixed, **options)``."""

    def build(spec: StudySpec, options: dict[str, Any]) -> BaseSampler:
        import optuna

        extra = {"constraints_func": constraints_func(spec)} if spec.constraints else {}
        made: BaseSampler = getattr(optuna.samplers, cls)(
            seed=spec.sampler.seed, **fixed, **extra, **options
        )
        return made

    return build


# The user attribute a worker sets on a COMPLETE or PRUNED trial before telling Optuna: the
# violation of each of the study's constraints (<= 0: satisfied), in the spec's order.
CONSTRAINTS_ATTR = "seqtune_constraints"


def constraints_func(spec: StudySpec) -> Callable[[Any], list[float]]:
    """Optuna's ``constraints_func`` for the study: the violations the worker measured and
    stored on the trial (``CONSTRAINTS_ATTR``). A trial without them (none measured) counts
    as infeasible: a sampler must not learn from it as if it were allowed."""
    n = len(spec.constraints)

    def violations(trial: Any) -> list[float]:
        got = trial.user_attrs.get(CONSTRAINTS_ATTR)
        if isinstance(got, list) and len(got) == n:
            return [float(v) if v is not None else 1.0 for v in got]
        return [1.0] * n

    return violations


def _grid(spec: StudySpec, options: dict[str, Any]) -> BaseSampler:
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid, less its ``after_trial``: that calls ``study.stop()`` once the grid
        is exhausted, which raises outside ``optimize()`` (a worker's tell of the last
        point). seqtune's budget ends the study."""

        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            return None

    # check_spec has made every dimension discrete (no None in the grid) and bounded its size.
    sampler = Grid(
        spec.grid_points(),  # type: ignore[arg-type]
        seed=spec.sampler.seed,
    )
    if spec.conditions():
        # A conditional grid: the points that differ only in inactive parameters are one
        # configuration; keep one of each (inactive values are never suggested). Samplers are
        # made for every ask and tell: the de-duplicated grid is computed once per process.
        key = (spec.sampler.seed, repr(sorted(spec.model_dump()["search_space"].items())))
        points = _CONDITIONAL_GRIDS.get(key)
        if points is None:
            names = list(sampler._param_names)
            seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}
            for point in sampler._all_grids:
                values = dict(zip(names, point, strict=True))
                on = spec.active(values)
                seen.setdefault(tuple((n, values[n]) for n in names if on.get(n, True)), point)
            points = list(seen.values())
            if len(_CONDITIONAL_GRIDS) > 32:
                _CONDITIONAL_GRIDS.clear()
            _CONDITIONAL_GRIDS[key] = points
        sampler._all_grids = list(points)
        sampler._n_min_trials = len(points)
    return sampler


_CONDITIONAL_GRIDS: dict[tuple[Any, str], list[tuple[Any, ...]]] = {}


def _pruner(cls: str) -> Callable[[dict[str, Any], BasePruner | None], BasePruner]:
    """The constructor of ``optuna.pruners.<cls>(**options)``."""

    def build(options: dict[str, Any], wrapped: BasePruner | None) -> BasePruner:
        import optuna

        made: BasePruner = getattr(optuna.pruners, cls)(**options)
        return made

    return build


def _patient(options: dict[str, Any], wrapped: BasePruner | None) -> BasePruner:
    import optuna

    return optuna.pruners.PatientPruner(wrapped, **options)


def _lower_or_upper(options: Mapping[str, Any]) -> str | None:
    if options.get("lower") is None and options.get("upper") is None:
        return "pruner 'threshold' needs 'lower' or 'upper'"
    return None


# ---- the tables -----------------------------------------------------------------------------
# Order is the order the schema's enum lists and pydantic's "Input should be ..." message names.

_NO_WARN = {"warn_independent_sampling": False}  # seqtune searches mixed spaces on purpose

_SAMPLERS: tuple[Sampler, ...] = (
    Sampler(
        "tpe",
        {
            "n_startup_trials": integer(0, 100_000),
            "n_ei_candidates": integer(1, 10_000),
            "multivariate": flag(),
            "group": flag(),
            "constant_liar": flag(),
            "consider_endpoints": flag(),
            "prior_weight": real(0.0, 1e6),
        },
        _sampler("TPESampler"),
        constraints=True,
    ),
    Sampler("random", {}, _sampler("RandomSampler")),
    Sampler("grid", {}, _grid, grid=True),
    Sampler(
        "cmaes",
        {
            "n_startup_trials": integer(0, 100_000),
            "sigma0": real(1e-12, 1e12),
            "popsize": integer(2, 100_000),
            "use_separable_cma": flag(),
            "with_margin": flag(),
            "lr_adapt": flag(),
            "consider_pruned_trials": flag(),
            "restart_strategy": one_of("ipop", "bipop"),
        },
        _sampler("CmaEsSampler", **_NO_WARN),
        single_objective=True,
    ),
    Sampler(
        "gp",
        {"n_startup_trials": integer(0, 100_000), "deterministic_objective": flag()},
        _sampler("GPSampler", **_NO_WARN),
        constraints=True,
    ),
    Sampler(
        "qmc",
        {"qmc_type": one_of("sobol", "halton"), "scramble": flag()},
        _sampler("QMCSampler", **_NO_WARN),
    ),
    Sampler(
        "nsga2",
        {
            "population_size": integer(2, 100_000),
            "mutation_prob": real(0.0, 1.0),
            "crossover_prob": real(0.0, 1.0),
            "swapping_prob": real(0.0, 1.0),
        },
        _sampler("NSGAIISampler"),
        constraints=True,
    ),
)

_COMMON_PRUNE: dict[str, Option] = {
    "n_startup_trials": integer(0, 100_000),
    "n_warmup_steps": integer(0, 1_000_000),
    "interval_steps": integer(1, 1_000_000),
    "n_min_trials": integer(1, 100_000),
}

_PRUNERS: tuple[Pruner, ...] = (
    Pruner("none", {}, _pruner("NopPruner")),
    Pruner("median", _COMMON_PRUNE, _pruner("MedianPruner")),
    Pruner(
        "percentile",
        {**_COMMON_PRUNE, "percentile": real(0.0, 100.0, required=True)},
        _pruner("PercentilePruner"),
    ),
    Pruner(
        "successive_halving",
        {
            "min_resource": integer_or_auto(1, 1_000_000),
            "reduction_factor": integer(2, 100),
            "min_early_stopping_rate": integer(0, 100),
            "bootstrap_count": integer(0, 1000),
        },
        _pruner("SuccessiveHalvingPruner"),
    ),
    Pruner(
        "hyperband",
        {
            "min_resource": integer(1, 1_000_000),
            "max_resource": integer_or_auto(1, 1_000_000),
            "reduction_factor": integer(2, 100),
            "bootstrap_count": integer(0, 1000),
        },
        _pruner("HyperbandPruner"),
    ),
    Pruner(
        "threshold",
        {
            "lower": real(-1e300, 1e300),
            "upper": real(-1e300, 1e300),
            "n_warmup_steps": integer(0, 1_000_000),
            "interval_steps": integer(1, 1_000_000),
        },
        _pruner("ThresholdPruner"),
        check=_lower_or_upper,
    ),
    Pruner(
        "patient",
        {"patience": integer(0, 100_000, required=True), "min_delta": real(0.0, 1e300)},
        _patient,
        wraps=True,
    ),
    Pruner(
        "wilcoxon",
        {"p_threshold": real(0.0, 1.0), "n_startup_steps": integer(0, 1_000_000)},
        _pruner("WilcoxonPruner"),
    ),
)

SAMPLERS: dict[str, Sampler] = {s.name: s for s in _SAMPLERS}
PRUNERS: dict[str, Pruner] = {p.name: p for p in _PRUNERS}


def _given(options: Mapping[str, Any]) -> dict[str, Any]:
    # null means "Optuna's default": leave it out rather than pass None.
    return {k: v for k, v in options.items() if v is not None}


def make_sampler(spec: StudySpec) -> BaseSampler:
    """The Optuna sampler of a checked study (``check_spec`` passed). Imports optuna.
    Optuna's ExperimentalWarning (TPE's ``group``, ``constraints_func``) is silenced here: a
    study names these on purpose, and a worker makes samplers for every ask."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return SAMPLERS[spec.sampler.name].build(spec, _given(spec.sampler.options))


def make_pruner(pruner: PrunerSpec) -> BasePruner:
    """The Optuna pruner of a checked study's ``pruner`` (and the pruner it wraps, if any)."""
    entry = PRUNERS[pruner.name]
    wrapped = make_pruner(pruner.wrapped) if entry.wraps and pruner.wrapped is not None else None
    return entry.build(_given(pruner.options), wrapped)

"""The study definition: one validated schema, the same as a JSON body and as a YAML file.

``StudySpec`` checks shapes and types (pydantic); ``check_spec`` checks meaning (known
hyperparameter names, ranges inside the engine's bounds, options the sampler and pruner take,
objectives that fit the task). Both report problems as ``{field, reason}`` pairs. The names
and options of samplers and pruners come from ``seqtune.search``, hyperparameters from
``seqtune.hparams``, datasets and metrics from ``seqtune.catalog``: add entries there, not here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from seqtune import catalog, search
from seqtune.errors import Invalid
from seqtune.hparams import HPARAMS, defaults

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
Scalar = bool | int | float | str


def integral(v: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema says); true and "3" are
    not integers (strict mode rejects them)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# Optional integers spell it out as Annotated[int, Field(bounds), BeforeValidator(integral)]:
# pydantic keeps the bounds out of the JSON schema when they wrap a validated alias.
Int = Annotated[int, BeforeValidator(integral)]


class _Strict(BaseModel):
    # strict: a value has the type the schema names (no "5" or true for an integer, no 1 for a
    # boolean), so what the OpenAPI document promises is what the API accepts.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# ---- search space ---------------------------------------------------------------------------


# A parameter's condition: parent name -> the parent's values under which it is active. Several
# parents must all hold. ``check_spec`` checks that each parent is a searched categorical, that
# the values are among its choices, and that conditions form no cycle.
Condition = Annotated[
    dict[str, Annotated[list[Scalar], Field(min_length=1, max_length=1000)]],
    Field(min_length=1, max_length=8),
]


class IntRange(_Strict):
    type: Literal["int"]
    low: Int = Field(ge=-(10**9), le=10**9)
    high: Int = Field(ge=-(10**9), le=10**9)
    step: Int = Field(default=1, ge=1, le=10**9)
    log: bool = False
    # Active only when each named categorical parent takes one of the listed values
    # (``{optimizer: [sgd, rmsprop]}``); absent from a trial's params otherwise.
    when: Condition | None = None

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log=true needs low > 0")
        if self.log and self.step != 1:
            raise ValueError("log=true needs step=1")
        return self


class FloatRange(_Strict):
    type: Literal["float"]
    low: float = Field(ge=-1e12, le=1e12)
    high: float = Field(ge=-1e12, le=1e12)
    step: float | None = Field(default=None, gt=0, le=1e12)
    log: bool = False
    # Active only when each named categorical parent takes one of the listed values
    # (``{optimizer: [sgd, rmsprop]}``); absent from a trial's params otherwise.
    when: Condition | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log=true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log=true cannot be combined with step")
        return self


class Categorical(_Strict):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1, max_length=1000)
    # Active only when each named categorical parent takes one of the listed values
    # (``{optimizer: [sgd, rmsprop]}``); absent from a trial's params otherwise.
    when: Condition | None = None

    @model_validator(mode="after")
    def _check(self) -> Categorical:
        seen = [repr(c) for c in self.choices]
        if len(set(seen)) != len(seen):
            raise ValueError("choices must not repeat")
        return self


Distribution = Annotated[IntRange | FloatRange | Categorical, Field(discriminator="type")]

# ---- data -----------------------------------------------------------------------------------


# Names the schema lists as enumerations; check_spec rejects others with a message that lists
# them (422), so the document and the service agree.
def _one_of(names: Any) -> dict[str, Any]:
    return {"enum": sorted(names)}


class BuiltinData(_Strict):
    kind: Literal["builtin"]
    name: str = Field(max_length=64, json_schema_extra=_one_of(catalog.BUILTIN))


class SyntheticData(_Strict):
    kind: Literal["synthetic"]
    generator: str = Field(max_length=64, json_schema_extra=_one_of(catalog.SYNTHETIC))
    n_points: Int = Field(default=2000, ge=50, le=5_000_000)
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)
    options: dict[str, float] = Field(default_factory=dict, max_length=16)


def _dataset_id(v: Any) -> Any:
    """An id is hex; any other word there is most likely the dataset's name."""
    if isinstance(v, str) and not re.fullmatch(r"[0-9a-f]+", v):
        raise PydanticCustomError(
            "dataset_id",
            "'{value}' is not a dataset id (up to 32 hex digits); to use a dataset by its "
            "name, write `name: {value}` instead of `id:`",
            {"value": v},
        )
    return v


class UploadedData(_Strict):
    """An uploaded CSV, by its ``name`` or its ``id``. The service resolves a name at submit
    and records the id beside it, so that the stored study names the very data it ran on;
    given both, they must name the same dataset."""

    kind: Literal["uploaded"]
    id: (
        Annotated[
            str,
            Field(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$"),
            BeforeValidator(_dataset_id),  # after Field: the schema keeps the pattern
        ]
        | None
    ) = None
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @model_validator(mode="after")
    def _named(self) -> UploadedData:
        if self.id is None and self.name is None:
            raise PydanticCustomError(
                "dataset_ref", "name the dataset: `name: NAME` (as uploaded) or `id: ID`"
            )
        return self


DataRef = Annotated[BuiltinData | SyntheticData | UploadedData, Field(discriminator="kind")]


class Splits(_Strict):
    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.15, gt=0, lt=1)
    test: float = Field(default=0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> Splits:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must be 1 (got {total:g})")
        return self


# ---- search machinery -----------------------------------------------------------------------


class Objective(_Strict):
    metric: str = Field(max_length=64, json_schema_extra=_one_of(catalog.METRICS))
    direction: Literal["minimize", "maximize"] | None = None  # default: the metric's natural one


# The names seqtune.search's tables hold, as a Literal: pydantic rejects others ("Input should
# be ...") and the schema lists them as an enum. mypy cannot read a Literal built at run time.
if TYPE_CHECKING:
    SamplerName = str
    PrunerName = str
else:
    SamplerName = Literal[tuple(search.SAMPLERS)]
    PrunerName = Literal[tuple(search.PRUNERS)]


class SamplerSpec(_Strict):
    name: SamplerName = "tpe"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), BeforeValidator(integral)] | None = None
    options: dict[str, Scalar | None] = Field(default_factory=dict, max_length=32)
    # At most this many suggestions asked ahead of claims, on Postgres (0: none; each claim
    # asks). The buffer holds about four seconds of recent claims, at least one, at most this.
    buffer: Int = Field(default=64, ge=0, le=256)


class PrunerSpec(_Strict):
    name: PrunerName = "hyperband"
    options: dict[str, Scalar | None] = Field(default_factory=dict, max_length=32)
    wrapped: PrunerSpec | None = None  # the pruner that ``patient`` wraps


class EarlyStopping(_Strict):
    # null turns it off
    patience: Annotated[int, Field(ge=1, le=100_000), BeforeValidator(integral)] | None = 10
    min_delta: float = Field(default=0.0, ge=0, le=1e9)


class StopWhen(_Strict):
    """Automatic stopping: end the study (``completed``, with its stop reason) once its
    improvements have dried up, instead of spending the rest of ``n_trials``."""

    # Stop after this many finished trials (complete or pruned) in a row that did not improve
    # the best value by more than ``min_delta``.
    no_improvement_trials: (
        Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(integral)] | None
    ) = None
    min_delta: float = Field(default=0.0, ge=0, le=1e300)
    # Optuna's Terminator: stop once the GP regret bound (how much better the best value
    # could still get) falls below the objective's error estimated by the median-error rule.
    regret_bound: bool = False
    # Neither criterion stops a study before this many trials completed.
    min_trials: Int = Field(default=10, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _some(self) -> StopWhen:
        if self.no_improvement_trials is None and not self.regret_bound:
            raise ValueError("set no_improvement_trials, regret_bound or both")
        return self


class Constraint(_Strict):
    """A bound a trial must respect to count: ``param_count``, ``train_seconds`` or a
    validation metric, at most ``max`` and/or at least ``min``. An infeasible trial is
    recorded as such and is never the best nor on the Pareto front."""

    metric: str = Field(max_length=64, json_schema_extra=_one_of(catalog.METRICS))
    max: float | None = Field(default=None, ge=-1e300, le=1e300)
    min: float | None = Field(default=None, ge=-1e300, le=1e300)

    @model_validator(mode="after")
    def _bounded(self) -> Constraint:
        if self.max is None and self.min is None:
            raise ValueError("give max, min or both")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 when satisfied, else by how much it is violated."""
        over = value - self.max if self.max is not None else -math.inf
        under = self.min - value if self.min is not None else -math.inf
        return float(max(over, under))


class InitFrom(_Strict):
    """Start each trial's LSTM from an earlier model: a trial of another study of the same
    tenant (``study`` and ``trial``: a number or ``best``, resolved to a number at submit) or
    an uploaded model (``model``: the id ``POST /v1/models`` returned)."""

    study: str | None = Field(default=None, pattern=NAME_PATTERN)
    trial: Annotated[int, Field(ge=0, le=10**9)] | Literal["best"] = "best"
    model: str | None = Field(default=None, min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")

    @model_validator(mode="after")
    def _one_source(self) -> InitFrom:
        if (self.study is None) == (self.model is None):
            raise ValueError("name either a study (with its trial) or an uploaded model")
        return self


class Budget(_Strict):
    n_trials: Int = Field(default=50, ge=1, le=1_000_000)
    max_concurrent_trials: (
        Annotated[int, Field(ge=1, le=100_000), BeforeValidator(integral)] | None
    ) = None
    timeout_s: float | None = Field(default=None, gt=0, le=366 * 86400)
    trial_timeout_s: float | None = Field(default=None, gt=0, le=30 * 86400)
    max_retries: Int = Field(default=2, ge=0, le=100)
    lease_timeout_s: float = Field(default=300, ge=5, le=86400)
    stop_when: StopWhen | None = None


class Validation(_Strict):
    """How a trial is validated: one chronological hold-out split (the default), or
    walk-forward folds over the validation region (see the README, "Validation")."""

    scheme: Literal["holdout", "walk_forward"] = "holdout"
    folds: Int = Field(default=3, ge=2, le=20)
    gap: Int = Field(default=0, ge=0, le=100_000)  # points between training and each fold


def _columns(field: str) -> Any:
    """A before-validator for a list of column names: one bare name gets told to be a list."""

    def check(v: Any) -> Any:
        if isinstance(v, str):
            raise PydanticCustomError(
                "column_list",
                f"{field} must be a list of column names: write `{field}: [{{value}}]`",
                {"value": v},
            )
        return v

    return check


class Final(_Strict):
    """Robust final selection: after the search, re-train the top-k configurations with
    several seeds and pick the winner by its mean validation metric."""

    top_k: Int = Field(default=3, ge=1, le=20)
    seeds: Int = Field(default=5, ge=2, le=20)


class StudySpec(_Strict):
    """A study, as submitted. See ``examples/*.yaml`` for complete examples."""

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '_', '.', '-'")
    task: Literal["forecast", "classify"] = "forecast"
    dataset: DataRef
    target: Annotated[list[str], BeforeValidator(_columns("target"))] | None = Field(
        default=None, max_length=256
    )
    features: Annotated[list[str], BeforeValidator(_columns("features"))] | None = Field(
        default=None, max_length=4096
    )
    horizon: Int = Field(default=1, ge=1, le=10_000)
    splits: Splits = Field(default_factory=Splits)
    missing: Literal["interpolate", "drop"] = "interpolate"
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="val_loss")], min_length=1, max_length=4
    )
    search_space: dict[str, Distribution] = Field(
        default_factory=dict, max_length=64, json_schema_extra={"propertyNames": _one_of(HPARAMS)}
    )
    fixed: dict[str, Scalar] = Field(
        default_factory=dict, max_length=64, json_schema_extra={"propertyNames": _one_of(HPARAMS)}
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    budget: Budget = Field(default_factory=Budget)
    priority: Int = Field(default=0, ge=-100, le=100)
    season: Annotated[int, Field(ge=2, le=100_000), BeforeValidator(integral)] | None = Field(
        default=None, description="season length for the baselines; null: detected"
    )
    validation: Validation = Field(default_factory=Validation)
    final: Final | None = None
    constraints: list[Constraint] = Field(default_factory=list, max_length=16)
    init_from: InitFrom | None = None

    @model_validator(mode="after")
    def _resolve_defaults(self) -> StudySpec:
        """Fill what a study leaves out, so the stored spec says exactly what runs: the
        objective (forecast: val_rmse, in original units, comparable across scalers and
        target transforms; classify: val_loss) and, with no search space, seqtune's default
        space for the task (``default_search_space``)."""
        if "objectives" not in self.model_fields_set and self.task == "forecast":
            self.objectives = [Objective(metric="val_rmse")]
        if "search_space" not in self.model_fields_set:
            self.search_space = default_search_space(self)
            self._space_defaulted = True
        return self

    @model_validator(mode="after")
    def _resolve_conditional_tpe(self) -> StudySpec:
        """A conditional space searched by TPE without ``multivariate``/``group`` set gets
        both: grouped, multivariate TPE models each set of parameters that appear together,
        where independent TPE would see the conditional ones on a fraction of the trials."""
        options = self.sampler.options
        if (
            self.sampler.name == "tpe"
            and self.conditions()
            and options.get("multivariate") is None
            and options.get("group") is None
        ):
            options.update(multivariate=True, group=True)
        return self

    def conditions(self) -> dict[str, dict[str, list[Scalar]]]:
        """Each conditional parameter's condition (parent -> active values)."""
        return {n: d.when for n, d in self.search_space.items() if d.when}

    def active(self, params: Mapping[str, Any]) -> dict[str, bool]:
        """Whether each searched parameter is active given (some of) a trial's values.
        A parameter whose parent is inactive or absent is inactive."""
        out: dict[str, bool] = {}

        def on(name: str, seen: frozenset[str] = frozenset()) -> bool:
            if name not in out:
                dist = self.search_space[name]
                ok = True
                for parent, values in (dist.when or {}).items():
                    if parent in seen or parent not in self.search_space:
                        ok = False
                        break
                    if not on(parent, seen | {name}) or not _among(params.get(parent), values):
                        ok = False
                        break
                out[name] = ok
            return out[name]

        for name in self.search_space:
            on(name)
        return out

    def ancestors(self, name: str) -> set[str]:
        """The parameters ``name``'s condition depends on, directly or through its parents."""
        out: set[str] = set()
        todo = list((self.search_space[name].when or {}) if name in self.search_space else ())
        while todo:
            parent = todo.pop()
            if parent not in out:
                out.add(parent)
                if parent in self.search_space:
                    todo.extend(self.search_space[parent].when or {})
        return out

    def search_order(self) -> list[str]:
        """The searched parameters, each after the parents its condition names (define-by-run
        order); otherwise in the spec's order. ``check_spec`` has ruled out cycles."""
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...] = ()) -> None:
            if name in done or name in path or name not in self.search_space:
                return
            for parent in self.search_space[name].when or {}:
                visit(parent, (*path, name))
            done.append(name)

        for name in self.search_space:
            visit(name)
        return done

    _space_defaulted: bool = PrivateAttr(default=False)

    @property
    def space_defaulted(self) -> bool:
        """True when ``search_space`` is seqtune's default (the study named none)."""
        return self._space_defaulted

    def n_points(self) -> int | None:
        """The dataset's length where the spec alone tells it (built-in and synthetic)."""
        if isinstance(self.dataset, SyntheticData):
            return self.dataset.n_points
        if isinstance(self.dataset, BuiltinData) and self.dataset.name in catalog.BUILTIN:
            return catalog.BUILTIN[self.dataset.name].n_points
        return None

    @model_validator(mode="after")
    def _resolve_pruner(self) -> StudySpec:
        """Fill the pruner a study leaves out, so the stored spec says exactly what runs.

        No pruner given: hyperband (the evidence in BENCHMARKS.md, "Search efficiency") with
        ``min_resource`` = max_epochs / 20 but at least 3 epochs (pruning from epoch 1 did
        worse there), ``max_resource`` = max_epochs and
        ``reduction_factor`` 3; with several objectives, none (Optuna cannot prune them).
        A hyperband pruner without ``max_resource`` gets max_epochs too: Optuna's 'auto' takes the
        first finished trial's last epoch, which early stopping makes too small.
        """
        if "pruner" not in self.model_fields_set:
            if len(self.objectives) > 1:
                self.pruner = PrunerSpec(name="none")
            else:
                top = self.max_epochs_bound() * self.n_folds
                self.pruner = PrunerSpec(
                    name="hyperband",
                    options={
                        "min_resource": min(top, max(3, top // 20)),
                        "max_resource": top,
                        "reduction_factor": 3,
                    },
                )
        elif self.pruner.name == "hyperband" and "max_resource" not in self.pruner.options:
            self.pruner.options["max_resource"] = self.max_epochs_bound() * self.n_folds
        return self

    @property
    def n_folds(self) -> int:
        """Validation folds a trial trains (1 for the hold-out split). Pruning steps run
        ``fold * max_epochs + epoch``, so a pruner's resources span every fold."""
        return self.validation.folds if self.validation.scheme == "walk_forward" else 1

    def max_epochs_bound(self) -> int:
        """The most epochs a trial of this study can run (fixed, searched high, or default)."""
        dist = self.search_space.get("max_epochs")
        value: Any = (
            dist.high
            if isinstance(dist, IntRange)
            else self.fixed.get("max_epochs", HPARAMS["max_epochs"].default)
        )
        return (
            value
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1_000_000
            else int(HPARAMS["max_epochs"].default)
        )

    def grid_points(self) -> dict[str, list[Any] | None]:
        """Each searched hyperparameter's grid values (``grid_values``), for a grid sampler."""
        return {name: grid_values(d) for name, d in self.search_space.items()}

    @property
    def directions(self) -> list[str]:
        return [o.direction or catalog.METRICS[o.metric][0] for o in self.objectives]

    def fixed_config(self) -> dict[str, Scalar]:
        """Every hyperparameter not searched: the study's fixed value, else the default."""
        out: dict[str, Scalar] = {}
        for name, value in defaults().items():
            if name not in self.search_space:
                out[name] = self.fixed.get(name, value)
        return out


def _among(value: Any, values: list[Scalar]) -> bool:
    """``value`` is one of ``values``, type for type (True is not 1)."""
    return any(type(value) is type(v) and value == v for v in values)


# ---- the default search space ---------------------------------------------------------------


def default_search_space(spec: StudySpec, n_points: int | None = None) -> dict[str, Distribution]:
    """seqtune's search space for a study that names none, from the ranges LSTM guides
    recommend (units 16-256, 1-2 layers, dropout up to 0.5, Adam's lr 1e-4-1e-2, batch 32-128),
    plus ``target_transform`` for forecasting. ``seq_len`` is sized from the data: up to a fifth
    of the training split, at most 128; without a known length (an upload before its row count
    is read), up to 64. Hyperparameters the study fixes are left out."""
    n = n_points if n_points is not None else spec.n_points()
    n_train = int(round(n * spec.splits.train)) if n is not None else None
    high = 64 if n_train is None else max(4, min(128, (n_train - spec.horizon) // 5))
    space: dict[str, Distribution] = {
        "hidden_size": IntRange(type="int", low=16, high=256, log=True),
        "num_layers": IntRange(type="int", low=1, high=2),
        "dropout": FloatRange(type="float", low=0.0, high=0.5),
        "lr": FloatRange(type="float", low=1e-4, high=1e-2, log=True),
        "batch_size": Categorical(type="categorical", choices=[32, 64, 128]),
        "seq_len": IntRange(type="int", low=min(4, high), high=high, log=True),
    }
    if spec.task == "forecast":
        space["target_transform"] = Categorical(
            type="categorical", choices=["none", "diff", "window_norm", "residual"]
        )
    return {k: v for k, v in space.items() if k not in spec.fixed}


# ---- semantic checks ------------------------------------------------------------------------

MAX_GRID_POINTS = 1_000_000


def _check_options(
    kind: str,
    name: str,
    options: dict[str, Any],
    allowed: Mapping[str, search.Option],
    where: str,
    errors: list[dict[str, str]],
) -> None:
    for key, value in options.items():
        field = f"{where}.options.{key}"
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            errors.append(
                {
                    "field": field,
                    "reason": f"{kind} '{name}' takes no option '{key}' (known: {known})",
                }
            )
            continue
        option = allowed[key]
        typ, low, high = option.type, option.low, option.high
        if value is None:
            continue
        if typ == "bool":
            if not isinstance(value, bool):
                errors.append({"field": field, "reason": "must be true or false"})
            continue
        if typ == "str":
            if value not in option.choices:
                errors.append({"field": field, "reason": f"must be one of {list(option.choices)}"})
            continue
        if typ == "int_or_auto" and value == "auto":
            continue
        if typ in ("int", "int_or_auto") and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            errors.append(
                {
                    "field": field,
                    "reason": "must be an integer" + (" or 'auto'" if typ == "int_or_auto" else ""),
                }
            )
            continue
        if typ == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
            errors.append({"field": field, "reason": "must be a number"})
            continue
        assert low is not None and high is not None
        if not low <= value <= high:
            errors.append({"field": field, "reason": f"must be between {low} and {high}"})


def _check_dataset(
    spec: StudySpec, errors: list[dict[str, str]], uploaded_columns: list[str] | None
) -> tuple[str, ...] | None:
    """Returns the dataset's numeric columns when known, after checking the reference."""
    ds = spec.dataset
    if isinstance(ds, BuiltinData):
        info = catalog.BUILTIN.get(ds.name)
        if info is None:
            errors.append(
                {
                    "field": "dataset.name",
                    "reason": f"unknown built-in dataset; known: {sorted(catalog.BUILTIN)}",
                }
            )
            return None
    elif isinstance(ds, SyntheticData):
        info = catalog.SYNTHETIC.get(ds.generator)
        if info is None:
            errors.append(
                {
                    "field": "dataset.generator",
                    "reason": f"unknown generator; known: {sorted(catalog.SYNTHETIC)}",
                }
            )
            return None
        for key, value in ds.options.items():
            if key not in info.options:
                errors.append(
                    {
                        "field": f"dataset.options.{key}",
                        "reason": f"generator '{ds.generator}' takes {sorted(info.options)}",
                    }
                )
            elif not info.options[key][0] <= value <= info.options[key][1]:
                lo, hi, _ = info.options[key]
                errors.append(
                    {
                        "field": f"dataset.options.{key}",
                        "reason": f"must be between {lo:g} and {hi:g}",
                    }
                )
    else:
        return tuple(uploaded_columns) if uploaded_columns is not None else None
    if spec.task not in info.tasks:
        errors.append(
            {
                "field": "task",
                "reason": f"dataset '{info.name}' supports task(s) {list(info.tasks)}",
            }
        )
    if isinstance(ds, SyntheticData):
        cols = catalog.synthetic_columns(ds.generator, ds.options)
        return cols + (("label",) if spec.task == "classify" else ())
    return info.columns


def check_spec(spec: StudySpec, *, uploaded_columns: list[str] | None = None) -> None:
    """Check what the schema cannot: names, bounds, options, objectives against the task.

    ``uploaded_columns`` are the columns of the uploaded dataset the spec names, if any.
    Raises ``Invalid`` listing every problem found as ``{field, reason}``.
    """
    errors: list[dict[str, str]] = []
    columns = _check_dataset(spec, errors, uploaded_columns)
    if columns is not None:
        for key in ("target", "features"):
            for i, col in enumerate(getattr(spec, key) or []):
                if col not in columns:
                    errors.append(
                        {
                            "field": f"{key}[{i}]",
                            "reason": f"no column '{col}'; columns: {list(columns)}",
                        }
                    )
    if spec.task == "classify" and spec.target is not None and len(spec.target) != 1:
        errors.append({"field": "target", "reason": "classification takes exactly one label"})
    if spec.task == "classify" and spec.horizon != 1:
        errors.append({"field": "horizon", "reason": "classification needs horizon 1"})

    for i, obj in enumerate(spec.objectives):
        _check_metric(f"objectives[{i}].metric", obj.metric, spec.task, errors)
    if len({o.metric for o in spec.objectives}) != len(spec.objectives):
        errors.append({"field": "objectives", "reason": "each metric may appear once"})

    for name, dist in spec.search_space.items():
        _check_distribution(name, dist, errors)
    for name, value in spec.fixed.items():
        field = f"fixed.{name}"
        hp = HPARAMS.get(name)
        if hp is None:
            errors.append({"field": field, "reason": _unknown(name)})
        elif name in spec.search_space:
            errors.append({"field": field, "reason": "searched and fixed at once; pick one"})
        else:
            reason = _value_problem(name, value)
            if reason:
                errors.append({"field": field, "reason": reason})

    if spec.task == "classify":
        tt = spec.search_space.get("target_transform")
        if (isinstance(tt, Categorical) and tt.choices != ["none"]) or spec.fixed.get(
            "target_transform", "none"
        ) != "none":
            errors.append(
                {
                    "field": "search_space.target_transform"
                    if tt is not None
                    else "fixed.target_transform",
                    "reason": "target transforms apply to forecasting only",
                }
            )
    if spec.final is not None and len(spec.objectives) > 1:
        errors.append(
            {
                "field": "final",
                "reason": "final re-training picks one winner, so it needs a single objective",
            }
        )
    sampler = search.SAMPLERS[spec.sampler.name]
    _check_options(
        "sampler", sampler.name, spec.sampler.options, sampler.options, "sampler", errors
    )
    if sampler.grid:
        _check_grid(spec, errors)
    _check_pruner(spec.pruner, "pruner", errors)
    if len(spec.objectives) > 1 and spec.pruner.name != "none":
        errors.append(
            {
                "field": "pruner.name",
                "reason": "pruning needs a single objective; use 'none' with several objectives",
            }
        )
    if sampler.single_objective and len(spec.objectives) > 1:
        errors.append(
            {
                "field": "sampler.name",
                "reason": f"'{sampler.name}' handles one objective; use 'tpe' or 'nsga2'",
            }
        )
    _check_conditions(spec, errors)
    _check_constraints(spec, sampler, errors)
    _check_stop(spec, errors)
    _check_init(spec, errors)
    if errors:
        raise Invalid(f"the study definition has {len(errors)} problem(s)", details=errors)


def _check_metric(field: str, metric: str, task: str, errors: list[dict[str, str]]) -> None:
    """A metric (of an objective or a constraint) is known and applies to the task."""
    meta = catalog.METRICS.get(metric)
    if meta is None:
        errors.append(
            {"field": field, "reason": f"unknown metric; known: {sorted(catalog.METRICS)}"}
        )
    elif task not in meta[1]:
        errors.append({"field": field, "reason": f"'{metric}' does not apply to task '{task}'"})


def _check_conditions(spec: StudySpec, errors: list[dict[str, str]]) -> None:
    """Each parent a condition names is a searched categorical, each value one of its choices,
    and no parameter depends on itself through its parents."""
    for name, dist in spec.search_space.items():
        for parent, values in (dist.when or {}).items():
            field = f"search_space.{name}.when.{parent}"
            pdist = spec.search_space.get(parent)
            if parent == name:
                errors.append({"field": field, "reason": "a parameter cannot depend on itself"})
            elif pdist is None:
                where = (
                    "is fixed"
                    if parent in spec.fixed
                    else "is not searched"
                    if parent in HPARAMS
                    else "is not a hyperparameter"
                )
                errors.append(
                    {
                        "field": field,
                        "reason": f"'{parent}' {where}; a condition's parent must be a searched "
                        "categorical parameter",
                    }
                )
            elif not isinstance(pdist, Categorical):
                errors.append(
                    {
                        "field": field,
                        "reason": f"'{parent}' is searched as a range; a condition's parent "
                        "must be categorical",
                    }
                )
            else:
                for i, v in enumerate(values):
                    if not _among(v, pdist.choices):
                        errors.append(
                            {
                                "field": f"{field}[{i}]",
                                "reason": f"{v!r} is not one of {parent}'s choices "
                                f"{list(pdist.choices)}",
                            }
                        )
    # cycles: follow the parents; a path that comes back to a name it holds is one
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in spec.search_space:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name) :] + [name]
            errors.append(
                {
                    "field": f"search_space.{name}.when",
                    "reason": "conditions form a cycle: " + " -> ".join(cycle),
                }
            )
            return
        state[name] = 1
        for parent in spec.search_space[name].when or {}:
            if parent != name:
                visit(parent, [*path, name])
        state[name] = 2

    for name in spec.search_space:
        visit(name, [])


def _check_constraints(
    spec: StudySpec, sampler: search.Sampler, errors: list[dict[str, str]]
) -> None:
    for i, c in enumerate(spec.constraints):
        _check_metric(f"constraints[{i}].metric", c.metric, spec.task, errors)
    if spec.constraints and not sampler.constraints:
        able = " or ".join(f"'{x.name}'" for x in search.SAMPLERS.values() if x.constraints)
        errors.append(
            {
                "field": "sampler.name",
                "reason": f"'{sampler.name}' cannot take constraints; use {able}",
            }
        )


def _check_stop(spec: StudySpec, errors: list[dict[str, str]]) -> None:
    rule = spec.budget.stop_when
    if rule is not None and len(spec.objectives) > 1:
        errors.append(
            {
                "field": "budget.stop_when",
                "reason": "automatic stopping watches one best value; it needs a single objective",
            }
        )
    if rule is not None and rule.regret_bound and not spec.search_space:
        errors.append(
            {
                "field": "budget.stop_when.regret_bound",
                "reason": "the regret bound models the searched parameters; this study "
                "searches none",
            }
        )
    if spec.sampler.name == "tpe":
        opts = spec.sampler.options
        if opts.get("group") is True and opts.get("multivariate") is not True:
            errors.append(
                {
                    "field": "sampler.options.group",
                    "reason": "TPE's group needs multivariate: true",
                }
            )


def _check_init(spec: StudySpec, errors: list[dict[str, str]]) -> None:
    """What the spec alone tells about fine-tuning; the model's shapes are checked against
    it by the service (``service.store.lineage``), which can read the model."""
    frozen = spec.search_space.get("freeze_layers") or spec.fixed.get("freeze_layers")
    if frozen and spec.init_from is None:
        field = "search_space" if "freeze_layers" in spec.search_space else "fixed"
        errors.append(
            {
                "field": f"{field}.freeze_layers",
                "reason": "freezing layers needs a pretrained model: set init_from",
            }
        )
    if spec.init_from is not None and spec.init_from.study == spec.name:
        errors.append({"field": "init_from.study", "reason": "a study cannot start from itself"})


def _unknown(name: str) -> str:
    return f"unknown hyperparameter '{name}'; known: {', '.join(sorted(HPARAMS))}"


def _check_distribution(name: str, dist: Any, errors: list[dict[str, str]]) -> None:
    field = f"search_space.{name}"
    hp = HPARAMS.get(name)
    if hp is None:
        errors.append({"field": field, "reason": _unknown(name)})
        return
    if isinstance(dist, Categorical):
        for i, choice in enumerate(dist.choices):
            reason = _value_problem(name, choice)
            if reason:
                errors.append({"field": f"{field}.choices[{i}]", "reason": reason})
        return
    if hp.kind in ("bool", "categorical"):
        errors.append(
            {
                "field": f"{field}.type",
                "reason": f"'{name}' is {hp.kind}; search it with type 'categorical'",
            }
        )
        return
    if hp.kind == "int" and isinstance(dist, FloatRange):
        errors.append({"field": f"{field}.type", "reason": f"'{name}' is an integer; use 'int'"})
        return
    assert hp.low is not None and hp.high is not None
    for end in ("low", "high"):
        v = getattr(dist, end)
        if not hp.low <= v <= hp.high:
            errors.append(
                {"field": f"{field}.{end}", "reason": f"must be between {hp.low:g} and {hp.high:g}"}
            )


def _value_problem(name: str, value: Any) -> str | None:
    hp = HPARAMS[name]
    if hp.kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if hp.kind == "categorical":
        assert hp.choices is not None
        return (
            None
            if value in hp.choices and isinstance(value, str)
            else f"must be one of {list(hp.choices)}"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a{'n integer' if hp.kind == 'int' else ' number'}"
    if hp.kind == "int" and not isinstance(value, int):
        return "must be an integer"
    assert hp.low is not None and hp.high is not None
    if not hp.low <= value <= hp.high:
        return f"must be between {hp.low:g} and {hp.high:g}"
    return None


def grid_values(dist: Any) -> list[Any] | None:
    """The grid points of one dimension, or None when it is continuous."""
    if isinstance(dist, Categorical):
        return list(dist.choices)
    if isinstance(dist, IntRange):
        return (
            list(range(dist.low, dist.high + 1, dist.step))
            if not dist.log
            else list(range(dist.low, dist.high + 1))
        )
    if dist.step is not None:
        n = int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
        return [round(dist.low + i * dist.step, 12) for i in range(n)]
    return None


def _check_grid(spec: StudySpec, errors: list[dict[str, str]]) -> None:
    size = 1
    for name, dist in spec.search_space.items():
        if isinstance(dist, IntRange):
            n = (dist.high - dist.low) // dist.step + 1
        elif isinstance(dist, FloatRange):
            if dist.step is None:
                errors.append(
                    {
                        "field": f"search_space.{name}",
                        "reason": "grid search needs a step or choices for floats",
                    }
                )
                return
            n = int((dist.high - dist.low) / dist.step + 1e-9) + 1
        else:
            n = len(dist.choices)
        size *= n
        if size > MAX_GRID_POINTS:
            errors.append(
                {
                    "field": "search_space",
                    "reason": f"the grid has over {MAX_GRID_POINTS} points; coarsen the steps",
                }
            )
            return


def _check_pruner(pruner: PrunerSpec, where: str, errors: list[dict[str, str]]) -> None:
    entry = search.PRUNERS[pruner.name]
    _check_options("pruner", pruner.name, pruner.options, entry.options, where, errors)
    for key, option in entry.options.items():
        if option.required and key not in pruner.options:
            errors.append(
                {
                    "field": f"{where}.options.{key}",
                    "reason": f"pruner '{pruner.name}' needs option '{key}'",
                }
            )
    reason = entry.check(pruner.options) if entry.check is not None else None
    if reason:
        errors.append({"field": f"{where}.options", "reason": reason})
    if pruner.wrapped is not None:
        if not entry.wraps:
            wrappers = " or ".join(f"'{p.name}'" for p in search.PRUNERS.values() if p.wraps)
            errors.append(
                {"field": f"{where}.wrapped", "reason": f"only the {wrappers} pruner wraps another"}
            )
        elif search.PRUNERS[pruner.wrapped.name].wraps:
            errors.append(
                {
                    "field": f"{where}.wrapped.name",
                    "reason": f"'{pruner.name}' cannot wrap '{pruner.wrapped.name}'",
                }
            )
        else:
            _check_pruner(pruner.wrapped, f"{where}.wrapped", errors)


# ---- parsing helpers ------------------------------------------------------------------------


def errors_from_validation(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as ``{field, reason}``, with field paths like ``budget.n_trials``."""
    out = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if p not in ("body",)]
        # Discriminated unions add the tag to the path (search_space.lr.float.low): drop it.
        loc = [
            p
            for p in loc
            if p not in ("int", "float", "categorical", "builtin", "synthetic", "uploaded")
        ]
        out.append({"field": ".".join(loc) or "(body)", "reason": err["msg"]})
    return out


def parse_spec(data: Any) -> StudySpec:
    """Validate a decoded JSON/YAML document as a study. Raises ``Invalid`` with details."""
    if not isinstance(data, dict):
        raise Invalid("a study definition must be a JSON object / YAML mapping")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        details = errors_from_validation(exc)
        raise Invalid(
            f"the study definition has {len(details)} problem(s)", details=details
        ) from None
    return spec


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a study file means the number, as in
    YAML 1.2 and JSON. The API takes numbers only as numbers."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """A YAML (or JSON) document, with ``1e-4`` read as a number."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no Python object tags


def load_spec_file(path: str | Path) -> StudySpec:
    """Read and validate a YAML (or JSON) study file."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise Invalid(f"cannot read study file {path}: {exc}") from None
    spec = parse_spec(data)
    check_spec(spec)
    return spec

"""Plain values the data layer returns and the API serialises. Never live ORM rows."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from seqtune.states import StudyPhase, StudyStatus, TrialState, WorkerStatus

T = TypeVar("T")


def _values(*enums: type[StrEnum], lower: bool = False) -> tuple[str, ...]:
    """The members' strings in declaration order (then lower-cased copies with ``lower``)."""
    values = tuple(m.value for e in enums for m in e)
    return values + tuple(v.lower() for v in values) if lower else values


# The plots GET /v1/studies/{name}/plots/{kind} draws (service.plots has one row per kind),
# and the fields GET /v1/studies/{name}/trials sorts on (service.store.trials: each is a column).
PLOT_KINDS: tuple[str, ...] = ("history", "importance", "intermediate", "parallel", "contour")
TRIAL_SORT_KEYS: tuple[str, ...] = ("number", "value", "started_at", "finished_at")
# Each sort key ascending, then with '-' for descending.
_TRIAL_SORTS = tuple(prefix + key for key in TRIAL_SORT_KEYS for prefix in ("", "-"))

# The closed sets the API names, as Literals of the enums' strings (seqtune.states) and of the
# tuples above: the OpenAPI document lists them inline, and the views hold plain strings as the
# database does. Type checkers see ``str``: a Literal built at run time is opaque to them.
if TYPE_CHECKING:
    StudyStatusName = str
    TrialStateName = str
    TrialStateFilter = str
    StudyPhaseName = str
    WorkerStatusName = str
    PlotKind = str
    TrialSort = str
else:
    StudyStatusName = Literal[_values(StudyStatus)]
    TrialStateName = Literal[_values(TrialState)]
    # The trials filter takes a state in upper or lower case.
    TrialStateFilter = Literal[_values(TrialState, lower=True)]
    StudyPhaseName = Literal[_values(StudyPhase)]
    WorkerStatusName = Literal[_values(WorkerStatus)]
    PlotKind = Literal[PLOT_KINDS]
    TrialSort = Literal[_TRIAL_SORTS]

Direction = Literal["minimize", "maximize"]


class View(BaseModel):
    """The base of every view: frozen, since a view is a value read from the store (a changed
    copy is ``view.model_copy(update=...)``)."""

    model_config = ConfigDict(frozen=True)


class Page(View, Generic[T]):
    items: list[T]
    next_offset: int | None = None


class TrialCounts(View):
    waiting: int
    running: int
    complete: int
    pruned: int
    failed: int
    finished: int
    budget: int
    remaining: int
    # Of ``remaining``: suggestions asked ahead of the workers' claims (the sampler's buffer).
    buffered: int = 0


class StudyView(View):
    name: str
    tenant: str
    status: StudyStatusName
    task: Literal["forecast", "classify"]
    optuna_study_name: str
    optuna_study_id: int | None = None  # the dashboard's /dashboard/studies/{id}
    directions: list[Direction]
    priority: int
    trials: TrialCounts
    spec: dict[str, Any]
    created_at: AwareDatetime
    updated_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    # Classical baselines (see service.store.baselines): None until a worker claims them, then
    # {"status": computing | done | failed (seqtune.states.BaselinesStatus), ...}.
    baselines: dict[str, Any] | None = None
    # 'final' while/after the top configs are re-trained
    phase: StudyPhaseName = StudyPhase.SEARCH.value
    # Why the study stopped before its budget (automatic stopping, budget.stop_when), or None.
    stop_reason: str | None = None


class TrialView(View):
    number: int
    state: TrialStateName
    params: dict[str, Any]
    value: float | None = None
    values: list[float] | None = None
    reason: str | None = None
    test_metrics: dict[str, Any] | None = None
    info: dict[str, Any] = {}
    curve: list[dict[str, Any]] | None = None  # only in the single-trial view
    epochs: int = 0
    worker: str | None = None
    attempts: int = 0
    error: str | None = None
    created_at: AwareDatetime
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    duration_s: float | None = None
    final_of: int | None = None  # a final-phase re-train of this search trial's params
    # Constraints: whether the trial met them (None: the study has none, or it never got
    # that far; the violations are in info.constraints). Infeasible trials are never best.
    feasible: bool | None = None
    # Conditional parameters of the search space that this trial left out (their condition
    # did not hold): absent from ``params``.
    inactive: list[str] = []


class BestView(View):
    study: str
    directions: list[Direction]
    metrics: list[str]
    best: TrialView | None = None  # single objective
    pareto_front: list[TrialView] | None = None  # several objectives
    baselines: dict[str, Any] | None = None  # the study's baselines record, as stored
    # The best trial against the best baseline on validation (service.store.baselines.verdict);
    # None without finished baselines, with several objectives, or without the metric.
    verdict: dict[str, Any] | None = None
    # The final phase's re-trains grouped by search trial (service.store.studies.final_summary);
    # None while the study is in its search phase and has no finished re-train.
    final: dict[str, Any] | None = None


class ImportanceView(View):
    """Hyperparameter importances of one objective (Optuna's default evaluator)."""

    study: str
    metric: str
    evaluator: str
    n_trials: int
    importances: dict[str, float]


class DatasetView(View):
    id: str
    name: str
    sha256: str
    size_bytes: int
    n_rows: int
    columns: list[dict[str, Any]]
    created_at: AwareDatetime


class ModelView(View):
    """An uploaded model checkpoint, which a study may start from (``init_from: {model: ID}``).

    ``meta`` is what the file says of itself, read without running it: ``format``, ``model``
    (n_features, hidden_size, num_layers, dropout, bidirectional, head_dropout, out_dim,
    init), ``task``, ``features``, ``targets``, ``horizon``, ``seq_len`` and ``lineage`` (what
    it was fine-tuned from, or null)."""

    id: str
    name: str
    sha256: str
    size_bytes: int
    meta: dict[str, Any]
    created_at: AwareDatetime


class Readiness(View):
    """GET /readyz: 'ready' with the migration, or 'unavailable' (503) with the reason."""

    status: Literal["ready", "unavailable"]
    migration: str | None = None
    reason: str | None = Field(default=None, description="why the service is not ready")


class WorkerView(View):
    id: str
    host: str
    slot: int
    device: str
    pid: int
    status: WorkerStatusName
    versions: dict[str, Any]
    started_at: AwareDatetime
    heartbeat_at: AwareDatetime
    trials_done: int
    study: str | None = None  # the trial it runs, when the study is the caller's
    trial: int | None = None


def baseline_label(name: str, baselines: dict[str, Any]) -> str:
    """A baseline's name for people: 'AR(9)', 'ARIMA(9,1,0)', 'seasonal naive (52)'; the
    orders are left out when each target has its own fit (``params = {"targets": [...]}``)."""
    params = (baselines.get("models", {}).get(name) or {}).get("params") or {}
    if name == "ar" and params.get("p") is not None:
        return f"AR({params['p']})"
    if name == "arima":
        order = params.get("order")
        if order is None and all(k in params for k in ("p", "d", "q")):
            order = [params["p"], params["d"], params["q"]]
        return "ARIMA(" + ",".join(str(o) for o in order) + ")" if order else "ARIMA"
    if name == "seasonal_naive":
        season = params.get("season", baselines.get("season"))
        return f"seasonal naive ({season})" if season else "seasonal naive"
    return {
        "ar": "AR",
        "ets": "ETS",
        "majority": "majority-class",
        "logistic": "logistic regression",
    }.get(name, name.replace("_", " "))

"""/v1/studies: submit, inspect, steer and query studies and their trials."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from seqtune.errors import Invalid, NotFound
from seqtune.spec import (
    Scalar,
    StudySpec,
    UploadedData,
    check_spec,
    default_search_space,
    integral,
)
from seqtune.states import SETTABLE_STATUSES, StudyStatus
from seqtune.views import (
    BestView,
    ImportanceView,
    Page,
    PlotKind,
    StudyStatusName,
    StudyView,
    TrialSort,
    TrialStateFilter,
    TrialView,
)
from service import plots
from service.api.deps import AppState, state, tenant
from service.api.errors import responses
from service.hints import hint
from service.store import datasets, lineage, studies, trials

# Every route: 401 without a valid key, 422 for a bad parameter or body, 503 without the
# database. Each route adds the statuses it answers on top (404, 409, 413).
router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=responses(401, 422, 503))
_STUDY_404 = "no study of that name for this tenant"

StudyName = Annotated[str, Path(max_length=256, description="the study's name")]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=10**9)]

SUNSPOTS_EXAMPLE: dict[str, Any] = {
    "name": "sunspots-lstm",
    "task": "forecast",
    "dataset": {"kind": "builtin", "name": "sunspots"},
    "horizon": 1,
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {
        "hidden_size": {"type": "int", "low": 16, "high": 128, "log": True},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "seq_len": {"type": "int", "low": 8, "high": 48, "step": 4},
        "optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
    },
    "fixed": {"max_epochs": 60, "batch_size": 32},
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median", "options": {"n_warmup_steps": 5}},
    "budget": {"n_trials": 30},
}


# The statuses a PATCH may set: the user's moves of seqtune.states' transition table.
if TYPE_CHECKING:
    SettableStatus = str
else:
    SettableStatus = Literal[tuple(s.value for s in SETTABLE_STATUSES)]


class StudyPatch(BaseModel):
    """At least one field; a field left out stays as it is (null is not a value here)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})
    status: SettableStatus | SkipJsonSchema[None] = Field(
        default=None,
        description=f"'{StudyStatus.PAUSED}' holds new trials, '{StudyStatus.RUNNING}' resumes, "
        f"'{StudyStatus.STOPPED}' ends",
    )
    n_trials: (
        Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(integral)] | SkipJsonSchema[None]
    ) = None
    priority: (
        Annotated[int, Field(ge=-100, le=100), BeforeValidator(integral)] | SkipJsonSchema[None]
    ) = None

    @field_validator("status", "n_trials", "priority", mode="before")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("leave the field out instead of sending null")
        return v

    @model_validator(mode="after")
    def _something(self) -> StudyPatch:
        if not self.model_fields_set:
            raise ValueError("nothing to change; send status, n_trials or priority")
        return self


class EnqueueBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    params: dict[str, Scalar] = Field(max_length=64, description="hyperparameters to try")


def _check_with_dataset(st: AppState, who: str, spec: StudySpec) -> None:
    """Check the spec's meaning, with an uploaded dataset's columns. A dataset named by its
    name is resolved here, and its id recorded in ``spec.dataset`` beside the name: the
    stored study (and ``Study.dataset_id``) is pinned to the data it ran on, whatever is
    uploaded under that name later. Raises Invalid for an unknown dataset, or an id and a
    name that name two different ones."""
    cols = None
    ref = spec.dataset
    if isinstance(ref, UploadedData):
        field = "dataset.id" if ref.id is not None else "dataset.name"
        try:
            if ref.id is not None:
                ds = datasets.get_dataset(st.db, tenant=who, dataset_id=ref.id)
            else:
                ds = datasets.get_dataset(st.db, tenant=who, name=ref.name)
        except NotFound:
            shown = ref.id if ref.id is not None else ref.name
            raise Invalid(
                f"the study names an unknown dataset '{shown}'",
                details=[{"field": field, "reason": "no such dataset; " + hint("upload_dataset")}],
            ) from None
        if ref.name is not None and ds.name != ref.name:
            raise Invalid(
                "the study's dataset id and name disagree",
                details=[
                    {
                        "field": "dataset.name",
                        "reason": f"dataset {ds.id} is named '{ds.name}', not '{ref.name}'; "
                        "give one of them",
                    }
                ],
            )
        ref.id, ref.name = ds.id, ds.name  # pinned: create_study reads the id
        cols = [c["name"] for c in ds.columns]
        if spec.space_defaulted:  # size the default seq_len range from the upload's length
            spec.search_space = default_search_space(spec, ds.n_rows)
    check_spec(spec, uploaded_columns=cols)


@router.post(
    "",
    status_code=201,
    response_model=StudyView,
    responses=responses(
        409,
        413,
        422,
        s409="a study of that name exists",
        s422=(
            "the definition is invalid (the schema checks shapes, the service checks "
            "meaning: known names, ranges, options); `details` name the fields"
        ),
    ),
)
def create_study(
    spec: Annotated[
        StudySpec,
        Body(
            openapi_examples={
                "sunspots": {"summary": "LSTM on yearly sunspots", "value": SUNSPOTS_EXAMPLE}
            }
        ),
    ],
    response: Response,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> StudyView:
    """Submit a study. Workers start pulling its trials at once."""
    _check_with_dataset(st, who, spec)
    lineage.check_init(st.db, tenant=who, spec=spec)  # init_from: fits, and resolved in spec
    view = studies.create_study(st.db, st.storage, tenant=who, spec=spec)
    response.headers["Location"] = f"/v1/studies/{view.name}"
    return view


@router.get("", response_model=Page[StudyView])
def list_studies(
    status: StudyStatusName | SkipJsonSchema[None] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Page[StudyView]:
    """The caller's studies, newest first; filter by status."""
    return studies.list_studies(st.db, tenant=who, status=status, limit=limit, offset=offset)


def _json(model: BaseModel) -> Response:
    # Serialise once: FastAPI would otherwise validate the returned model again.
    return Response(model.model_dump_json(), media_type="application/json")


@router.get("/{name}", response_model=StudyView, responses=responses(404, s404=_STUDY_404))
def get_study(
    name: StudyName, st: AppState = Depends(state), who: str = Depends(tenant)
) -> Response:
    """A study with its trial counts and remaining budget."""
    return _json(studies.get_study(st.db, tenant=who, name=name))


@router.patch(
    "/{name}",
    response_model=StudyView,
    responses=responses(
        404,
        409,
        413,
        s404=_STUDY_404,
        s409="the study's status does not allow the change, or n_trials is below the trials "
        "already started",
    ),
)
def update_study(
    name: StudyName, patch: StudyPatch, st: AppState = Depends(state), who: str = Depends(tenant)
) -> StudyView:
    """Pause, resume or stop a study; raise its budget; change its priority."""
    if patch.status is None and patch.n_trials is None and patch.priority is None:
        raise Invalid("nothing to change; send status, n_trials or priority")
    return studies.update_study(
        st.db,
        tenant=who,
        name=name,
        status=patch.status,
        n_trials=patch.n_trials,
        priority=patch.priority,
        storage=st.storage,
    )


@router.delete(
    "/{name}",
    status_code=204,
    responses=responses(
        404,
        409,
        s404=_STUDY_404,
        s409="trials are running: stop the study first or pass force=true",
    ),
)
def delete_study(
    name: StudyName, force: bool = False, st: AppState = Depends(state), who: str = Depends(tenant)
) -> Response:
    """Delete a study, its trials and its Optuna study."""
    studies.delete_study(st.db, st.storage, tenant=who, name=name, force=force)
    return Response(status_code=204)


@router.get(
    "/{name}/trials", response_model=Page[TrialView], responses=responses(404, s404=_STUDY_404)
)
def list_trials(
    name: StudyName,
    state_: Annotated[TrialStateFilter | SkipJsonSchema[None], Query(alias="state")] = None,
    sort: Annotated[TrialSort, Query(description="a field; '-' prefix for descending")] = "number",
    limit: Limit = 100,
    offset: Offset = 0,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Page[TrialView]:
    """A page of trials (without learning curves)."""
    return trials.list_trials(
        st.db, tenant=who, name=name, state=state_, sort=sort, limit=limit, offset=offset
    )


@router.get(
    "/{name}/trials/{number}",
    response_model=TrialView,
    responses=responses(404, s404="no such study or trial"),
)
def get_trial(
    name: StudyName,
    number: Annotated[int, Path(ge=0, le=2**31 - 1)],
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> TrialView:
    """One trial: params, state, values, learning curve, reason, worker, timings, attempts."""
    return trials.get_trial(st.db, tenant=who, name=name, number=number)


@router.post(
    "/{name}/trials",
    status_code=201,
    response_model=TrialView,
    responses=responses(
        404,
        409,
        413,
        422,
        s404=_STUDY_404,
        s409="the study is stopped or finished, or its budget is spent",
        s422="the body is invalid, or the params do not fit the study's search space",
    ),
)
def enqueue_trial(
    name: StudyName, body: EnqueueBody, st: AppState = Depends(state), who: str = Depends(tenant)
) -> TrialView:
    """Queue given hyperparameters (warm start); they run before sampled trials."""
    return trials.enqueue_trial(st.db, st.storage, tenant=who, name=name, params=body.params)


@router.get(
    "/{name}/best",
    response_model=BestView,
    responses=responses(404, 409, s404=_STUDY_404, s409="no trial of the study has completed yet"),
)
def best(name: StudyName, st: AppState = Depends(state), who: str = Depends(tenant)) -> Response:
    """The best trial and its test metrics, or the Pareto front for several objectives.

    Reads one row by index: as fast with 100,000 trials as with 10."""
    return _json(studies.best(st.db, tenant=who, name=name))


Objective = Annotated[
    int,
    Query(
        ge=0,
        le=3,
        description=(
            "index into the study's objectives (a study has 1 to 4); 404 when it has fewer"
        ),
    ),
]


@router.get(
    "/{name}/importance",
    response_model=ImportanceView,
    responses=responses(
        404,
        409,
        s404="no such study, or it has no objective of that index",
        s409="not enough completed trials yet, or the study searches no hyperparameter",
    ),
)
def importance(
    name: StudyName,
    objective: Objective = 0,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> ImportanceView:
    """Hyperparameter importances (PED-ANOVA), once enough trials completed."""
    return studies.importance(st.db, st.storage, tenant=who, name=name, objective=objective)


@router.get(
    "/{name}/plots/{kind}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "text/html": {}}, "description": "the plot"},
        **responses(
            404,
            409,
            s404="no such study, or it has no objective of that index",
            s409="not enough completed trials or searched hyperparameters for this plot yet",
        ),
    },
)
def plot(
    name: StudyName,
    kind: Annotated[PlotKind, Path(description="which of Optuna's plots")],
    format: Annotated[Literal["png", "html"], Query()] = "png",  # noqa: A002
    objective: Objective = 0,
    params: Annotated[
        str | None,
        Query(
            max_length=2000,
            description="contour and parallel: the hyperparameters to draw, comma-separated "
            "(default: the 2 most important for contour, the 5 most important for parallel)",
            examples=["lr,hidden_size"],
        ),
    ] = None,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Response:
    """A plot of the study, drawn by Optuna's visualisation: PNG, or interactive HTML, titled
    with the study and the metric. Drawn once and served again until the study changes."""
    view = studies.get_study(st.db, tenant=who, name=name)
    names = [p.strip() for p in (params or "").split(",") if p.strip()]
    body, media = plots.render(
        st.storage, view, kind, db=st.db, fmt=format, objective=objective, params=names
    )
    return Response(body, media_type=media)


def _model_response(name: str, number: int, data: bytes) -> Response:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:100]
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{safe}-trial{number}.pt"',
            "X-Seqtune-Trial": str(number),
        },
    )


_MODEL_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {}},
        "description": "a torch checkpoint: weights, model config, scaler state, "
        "hyperparameters; load it with `seqtune predict` or worker.engine.Predictor",
    },
    **responses(
        404,
        409,
        s404="no such study or trial",
        s409="no model yet: no trial completed, the trial saved none (it "
        "trained no epoch), or the study has several objectives (no single "
        "best)",
    ),
}


@router.get("/{name}/best/model", response_class=Response, responses=_MODEL_DOC)
def best_model(
    name: StudyName, st: AppState = Depends(state), who: str = Depends(tenant)
) -> Response:
    """Download the best trial's trained model (restored best-epoch weights)."""
    model = trials.model_checkpoint(st.db, tenant=who, name=name)
    return _model_response(name, model.number, model.data)


@router.get("/{name}/trials/{number}/model", response_class=Response, responses=_MODEL_DOC)
def trial_model(
    name: StudyName,
    number: Annotated[int, Path(ge=0, le=2**31 - 1)],
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Response:
    """Download one trial's trained model."""
    model = trials.model_checkpoint(st.db, tenant=who, name=name, number=number)
    return _model_response(name, model.number, model.data)

"""/v1/models: uploaded model checkpoints, which a study may start its trials from."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile

from seqtune.views import ModelView, Page
from service.api.deps import AppState, state, tenant
from service.api.errors import responses
from service.store import models

# Every route: 401 without a valid key, 422 for a bad parameter, 503 without the database.
router = APIRouter(prefix="/v1/models", tags=["models"], responses=responses(401, 422, 503))
ModelId = Annotated[str, Path(max_length=64)]


@router.post(
    "",
    status_code=201,
    response_model=ModelView,
    responses=responses(
        413,
        422,
        s413="over the upload size cap (SEQTUNE_MAX_UPLOAD_BYTES)",
        s422="no file, or not a seqtune model file (the .pt GET .../model serves); "
        "the message says why",
    ),
)
def upload(
    file: Annotated[UploadFile, File(description="a model file GET .../model served (.pt)")],
    name: Annotated[str | None, Form(max_length=128)] = None,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> ModelView:
    """Upload a model (multipart field 'file') that studies may start from with
    `init_from: {model: ID}`. It is read, never run: what it says of itself (shape, task,
    features, lineage) comes back as `meta`."""
    return models.upload_model(
        st.db,
        tenant=who,
        name=name or file.filename or "model",
        stream=file.file,
        cap=st.settings.max_upload_bytes,
    )


@router.get("", response_model=Page[ModelView])
def list_models(
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Page[ModelView]:
    """The caller's uploaded models, newest first."""
    return models.list_models(st.db, tenant=who, limit=limit, offset=offset)


@router.get(
    "/{model_id}",
    response_model=ModelView,
    responses=responses(404, s404="no model of that id for this tenant"),
)
def get_model(
    model_id: ModelId, st: AppState = Depends(state), who: str = Depends(tenant)
) -> ModelView:
    return models.get_model(st.db, tenant=who, model_id=model_id)


@router.delete(
    "/{model_id}",
    status_code=204,
    responses=responses(
        404,
        409,
        s404="no model of that id for this tenant",
        s409="a running or paused study starts from the model",
    ),
)
def delete_model(
    model_id: ModelId, st: AppState = Depends(state), who: str = Depends(tenant)
) -> Response:
    """Delete a model; 409 while a running or paused study starts from it."""
    models.delete_model(st.db, tenant=who, model_id=model_id)
    return Response(status_code=204)

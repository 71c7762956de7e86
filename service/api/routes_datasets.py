"""/v1/datasets: CSV uploads, validated on arrival."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile

from seqtune.views import DatasetView, Page
from service.api.deps import AppState, state, tenant
from service.api.errors import responses
from service.store import datasets

# Every route: 401 without a valid key, 422 for a bad parameter, 503 without the database.
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=responses(401, 422, 503))
DatasetId = Annotated[
    str, Path(max_length=128, description="the dataset's id, or its name (unique per tenant)")
]


@router.post(
    "",
    status_code=201,
    response_model=DatasetView,
    responses=responses(
        409,
        413,
        422,
        s409="you already have a dataset of that name (names are unique per tenant)",
        s413="over the upload size cap (SEQTUNE_MAX_UPLOAD_BYTES)",
        s422="no file, or a bad CSV "
        "(empty, not UTF-8, no numeric column...); the message names "
        "the line",
    ),
)
def upload(
    file: Annotated[UploadFile, File(description="a CSV file with a header line")],
    name: Annotated[str | None, Form(max_length=128)] = None,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> DatasetView:
    """Upload a CSV (multipart field 'file'). It is parsed and validated before it is stored.
    Its name (``name``, else the file's name) is unique per tenant: a study may reference the
    dataset by it (``dataset: {kind: uploaded, name: ...}``)."""
    # Read from the spooled upload a chunk at a time, never whole: see datasets.upload_dataset.
    return datasets.upload_dataset(
        st.db,
        tenant=who,
        name=name or file.filename or "dataset",
        stream=file.file,
        cap=st.settings.max_upload_bytes,
    )


@router.get("", response_model=Page[DatasetView])
def list_datasets(
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Page[DatasetView]:
    return datasets.list_datasets(st.db, tenant=who, limit=limit, offset=offset)


@router.get(
    "/{dataset_id}",
    response_model=DatasetView,
    responses=responses(404, s404="no dataset of that id or name for this tenant"),
)
def get_dataset(
    dataset_id: DatasetId, st: AppState = Depends(state), who: str = Depends(tenant)
) -> DatasetView:
    """A dataset, by its id or its name."""
    return datasets.get_dataset(st.db, tenant=who, dataset_id=dataset_id, name=dataset_id)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    responses=responses(
        404,
        409,
        s404="no dataset of that id or name for this tenant",
        s409="studies use the dataset (the message names them): a running or paused one "
        "always, a finished one unless force=true",
    ),
)
def delete_dataset(
    dataset_id: DatasetId,
    force: Annotated[
        bool,
        Query(
            description="delete it although finished studies use it (they keep their spec "
            "and lose the link); running or paused ones still refuse"
        ),
    ] = False,
    st: AppState = Depends(state),
    who: str = Depends(tenant),
) -> Response:
    """Delete a dataset, by its id or its name; 409, naming them, while studies use it."""
    datasets.delete_dataset(st.db, tenant=who, dataset_id=dataset_id, force=force)
    return Response(status_code=204)

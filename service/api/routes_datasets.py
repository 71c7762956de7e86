"""/v1/datasets: CSV uploads, validated on arrival."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile

from service import datasets
from service.api.deps import AppState, state, tenant
from service.errors import Invalid, TooLarge
from service.views import DatasetView, Page

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DatasetId = Annotated[str, Path(max_length=64)]


@router.post("", status_code=201, response_model=DatasetView,
             responses={413: {"description": "over the upload size cap"},
                        422: {"description": "bad CSV; the message names the line"}})
def upload(file: Annotated[UploadFile, File(description="a CSV file with a header line")],
           name: Annotated[str | None, Form(max_length=128)] = None,
           st: AppState = Depends(state), who: str = Depends(tenant)) -> DatasetView:
    """Upload a CSV (multipart field 'file'). It is parsed and validated before it is stored."""
    cap = st.settings.max_upload_bytes
    content = file.file.read(cap + 1)
    if len(content) > cap:
        raise TooLarge(f"the file is over the {cap} byte cap (SEQTUNE_MAX_UPLOAD_BYTES)")
    if not content:
        raise Invalid("the uploaded file is empty")
    return datasets.create_dataset(st.db, tenant=who, name=name or file.filename or "dataset",
                                   content=content)


@router.get("", response_model=Page[DatasetView])
def list_datasets(limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
                  st: AppState = Depends(state), who: str = Depends(tenant)) -> Page[DatasetView]:
    return datasets.list_datasets(st.db, tenant=who, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetView)
def get_dataset(dataset_id: DatasetId, st: AppState = Depends(state),
                who: str = Depends(tenant)) -> DatasetView:
    return datasets.get_dataset(st.db, tenant=who, dataset_id=dataset_id)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: DatasetId, st: AppState = Depends(state),
                   who: str = Depends(tenant)) -> Response:
    """Delete a dataset; 409 while a running or paused study uses it."""
    datasets.delete_dataset(st.db, tenant=who, dataset_id=dataset_id)
    return Response(status_code=204)

"""Training data over HTTP: upload (CSV, ``.npy``, safetensors) and describe."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from ...training import read_dataset as find_dataset
from ...training.datasets import parse_upload, save_dataset
from ..deps import DatabaseDep, ReadAccess, SettingsDep, WriteAccess, multipart_file, read_body
from ..schemas import DatasetPublic, ErrorPublic, dataset_public

__all__ = ["router"]

router = APIRouter(prefix="/datasets", tags=["datasets"])

_ERR = {code: {"model": ErrorPublic, "description": text} for code, text in [
    (401, "Missing or invalid API key"), (403, "Key lacks the scope"), (404, "Unknown dataset"),
    (413, "Upload over NFSERVE_MAX_UPLOAD_BYTES"),
    (422, "Malformed file, non-numeric or non-finite values, wrong dtype")]}


@router.post("", status_code=201, response_model=DatasetPublic, dependencies=[WriteAccess],
             responses=_ERR)
async def create_dataset(
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    format: Annotated[Literal["csv", "npy", "safetensors"] | None,
                      Query(description="File format; default: from the file name, the content "
                                        "type, or the first bytes.")] = None,
    filename: Annotated[str | None, Query(max_length=256,
                                          description="Original file name.")] = None,
) -> DatasetPublic:
    """Upload training data: the file as the raw body (``text/csv``, ``application/octet-stream``)
    or as the form field ``file`` of a multipart upload. Answers id, rows and dim."""
    body = await read_body(request, settings.max_upload_bytes, what="Dataset upload")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body, part_name, part_type = await multipart_file(request, body)
        filename, content_type = filename or part_name, part_type or content_type
    parsed = await run_in_threadpool(parse_upload, body, filename=filename,
                                     content_type=content_type, format=format)
    row = await run_in_threadpool(save_dataset, db, settings.data_dir, parsed, filename=filename)
    return dataset_public(row)


@router.get("/{dataset_id}", response_model=DatasetPublic, dependencies=[ReadAccess],
            responses=_ERR)
def read_dataset(dataset_id: Annotated[str, Path(max_length=64)],
                 db: DatabaseDep) -> DatasetPublic:
    """A dataset's rows, dim, format and hash."""
    return dataset_public(find_dataset(db, dataset_id))

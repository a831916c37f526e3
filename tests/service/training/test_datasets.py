"""``POST /datasets`` and ``GET /datasets/{id}``: every accepted format, and every malformed file
refused with a 422 that counts the problems and says where they are. Nothing is ever unpickled."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from service.api import create_app
from service.settings import Settings

OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data",
                        embedded_worker=False, max_upload_bytes=200_000, _env_file=None)
    with TestClient(create_app(settings)) as client:
        yield client


def npy(a: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def post(api: TestClient, body: bytes, **params: str):
    return api.post("/datasets", content=body, headers=OCTET, params=params)


# ---------------------------------------------------------------------- accepted
def test_csv_with_header_is_stored_and_described(api: TestClient) -> None:
    r = api.post("/datasets", content=b"a,b,c\n1,2,3\n4,5,6.5\n-1e3,0,7\n",
                 headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["rows"], body["dim"], body["format"], body["context_dim"]) == (3, 3, "csv", 0)
    assert body["id"].startswith("ds_") and body["sha256"].startswith("sha256:")
    r = api.get(f"/datasets/{body['id']}")
    assert r.status_code == 200 and r.json() == body


@pytest.mark.parametrize("text", [b"1 2\n3 4\n", b"1\t2\n3\t4\n", b"1;2\n3;4\n",
                                  b"\xef\xbb\xbf1,2\r\n3,4\r\n\r\n"])
def test_csv_dialects(api: TestClient, text: bytes) -> None:
    r = api.post("/datasets", content=text, headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    assert (r.json()["rows"], r.json()["dim"]) == (2, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.float16])
def test_npy_numeric_dtypes(api: TestClient, dtype: type) -> None:
    r = post(api, npy(np.arange(12).reshape(6, 2).astype(dtype)), filename="x.npy")
    assert r.status_code == 201, r.text
    assert (r.json()["rows"], r.json()["dim"], r.json()["format"]) == (6, 2, "npy")


def test_npy_one_dimensional_is_one_column(api: TestClient) -> None:
    r = post(api, npy(np.linspace(0, 1, 9)))
    assert r.status_code == 201 and (r.json()["rows"], r.json()["dim"]) == (9, 1)


def test_safetensors_with_context(api: TestClient) -> None:
    body = st_save({"x": torch.randn(10, 3), "context": torch.randn(10, 2)})
    r = post(api, body, filename="train.safetensors")
    assert r.status_code == 201, r.text
    assert (r.json()["rows"], r.json()["dim"], r.json()["context_dim"]) == (10, 3, 2)
    assert r.json()["filename"] == "train.safetensors"


def test_multipart_upload(api: TestClient) -> None:
    r = api.post("/datasets", files={"file": ("pts.csv", b"x,y\n1,2\n3,4\n5,6\n", "text/csv")})
    assert r.status_code == 201, r.text
    assert (r.json()["rows"], r.json()["filename"]) == (3, "pts.csv")


# ---------------------------------------------------------------------- refused
@pytest.mark.parametrize(("body", "fragments"), [
    (b"1,2\n3,nan\n5,6\ninf,1\n-inf,2\n",
     ["3 rows hold NaN or inf", "line 2", "line 4", "line 5"]),
    (b"1,2\n3,abc\n5,\n7,8\n", ["2 cells are not numbers", "line 2 column 2: 'abc'",
                                "line 3 column 2: ''"]),
    (b"1,2\n3,4,5\n6\n7,8\n", ["2 rows do not have the 2 columns", "line 2 has 3 columns",
                               "line 3 has 1 columns"]),
    (b"a,b\n", ["no data rows"]),
    (b"\xff\xfe\x00garbage", ["not UTF-8"]),
])
def test_malformed_csv_is_refused_with_counts_and_positions(api: TestClient, body: bytes,
                                                            fragments: list[str]) -> None:
    r = api.post("/datasets", content=body, headers={"content-type": "text/csv"})
    assert r.status_code == 422, r.text
    for fragment in fragments:
        assert fragment in r.json()["detail"]


def test_csv_errors_list_the_first_positions_and_count_the_rest(api: TestClient) -> None:
    rows = [f"{i},{'nan' if i % 3 == 0 else i}" for i in range(30)]
    r = api.post("/datasets", content="\n".join(rows).encode(), headers={"content-type": "text/csv"})
    assert r.status_code == 422
    assert "10 rows hold NaN or inf" in r.json()["detail"]
    assert "and 5 more" in r.json()["detail"]


def test_npy_with_nan_rows_names_row_and_column(api: TestClient) -> None:
    a = np.ones((6, 3))
    a[1, 2] = np.nan
    a[4, 0] = np.inf
    r = post(api, npy(a))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "2 rows (2 values) hold NaN or inf" in detail
    assert "row index 1: column index 2 is nan" in detail and "row index 4" in detail


def test_pickled_npy_is_refused_and_never_unpickled(api: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    body = npy(np.array([Payload(), 1], dtype=object), allow_pickle=True)
    r = post(api, body, filename="evil.npy")
    assert r.status_code == 422
    assert "got dtype object" in r.json()["detail"]
    assert not marker.exists()


@pytest.mark.parametrize(("array", "fragment"), [
    (np.array(["a", "b"]), "got dtype <U1"),
    (np.ones((3, 2), dtype=bool), "got booleans"),
    (np.ones((2, 2), dtype=np.complex64), "got dtype complex64"),
    (np.ones((2, 2, 2)), "expected a 2-D array"),
    (np.zeros((0, 2)), "no data rows"),
    (np.zeros(3, dtype=[("a", "f4"), ("b", "f4")]), "expected real numbers"),
])
def test_npy_wrong_types_and_shapes(api: TestClient, array: np.ndarray, fragment: str) -> None:
    r = post(api, npy(array))
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_truncated_npy(api: TestClient) -> None:
    body = npy(np.ones((100, 2)))
    r = post(api, body[: len(body) // 2], filename="x.npy")
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    r = post(api, body[:30], filename="x.npy")
    assert r.status_code == 422 and ".npy" in r.json()["detail"]


@pytest.mark.parametrize(("tensors", "fragment"), [
    ({"x": torch.ones(3, 2, dtype=torch.bool)}, "got bool"),
    ({"a": torch.ones(3, 2), "b": torch.ones(3)}, "expected a tensor named 'x'"),
    ({"x": torch.ones(3, 2), "extra": torch.ones(3)}, "unexpected tensors ['extra']"),
    ({"x": torch.ones(3, 2), "context": torch.ones(4, 1)}, "'context' has 4 rows"),
    ({"x": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}, "1 row (1 value) holds NaN"),
])
def test_bad_safetensors(api: TestClient, tensors: dict, fragment: str) -> None:
    r = post(api, st_save(tensors), filename="d.safetensors")
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_corrupt_safetensors(api: TestClient) -> None:
    body = st_save({"x": torch.ones(30, 2)})
    r = post(api, body[:-20], filename="d.safetensors")
    assert r.status_code == 422 and "not a valid safetensors file" in r.json()["detail"]


def test_empty_and_oversized_uploads(api: TestClient) -> None:
    r = post(api, b"")
    assert r.status_code == 422 and "Empty upload" in r.json()["detail"]
    r = post(api, npy(np.ones((20_000, 2))))
    assert r.status_code == 413


def test_unknown_format_parameter_and_dataset(api: TestClient) -> None:
    assert post(api, b"1,2\n", format="parquet").status_code == 422
    assert api.get("/datasets/ds_unknown").status_code == 404

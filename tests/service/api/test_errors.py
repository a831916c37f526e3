"""Every bad input gets its 4xx with a precise message (real server + client), and no input gives a
500 (property test on the in-process app)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from service.api import create_app
from service.client import Client, InvalidInput, NotFound, PayloadTooLarge

from ..conftest import Server

OCTET = "application/octet-stream"


def test_log_prob_rejects_wrong_dimension(client: Client) -> None:
    with pytest.raises(InvalidInput, match="x has 3 columns; the model expects 2") as e:
        client.log_prob("tiny", np.zeros((4, 3)))
    assert e.value.status_code == 422


def test_log_prob_rejects_wrong_dimension_binary(client: Client) -> None:
    with pytest.raises(InvalidInput, match="x has 5 columns; the model expects 3"):
        client.log_prob("tiny3", np.zeros((4, 5), np.float32), binary=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("binary", [False, True])
def test_log_prob_rejects_non_finite_values(client: Client, bad: float, binary: bool) -> None:
    x = np.zeros((5, 2))
    x[3, 1] = bad
    with pytest.raises(InvalidInput, match=r"NaN or infinite values \(first at row 3, column 1\)"):
        client.log_prob("tiny", x, binary=binary)


def test_log_prob_rejects_null_in_json(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", json={"model": "tiny", "x": [[0, None]]})
    assert r.status_code == 422
    assert "null or non-numeric" in r.json()["detail"]


@pytest.mark.parametrize("binary", [False, True])
def test_log_prob_rejects_empty_input(client: Client, binary: bool) -> None:
    with pytest.raises(InvalidInput, match="x is empty"):
        client.log_prob("tiny", np.zeros((0, 2)), binary=binary)


def test_log_prob_rejects_ragged_rows(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", json={"model": "tiny", "x": [[0, 1], [2]]})
    assert r.status_code == 422
    assert "rectangular" in r.json()["detail"]


def test_log_prob_rejects_unknown_model(client: Client) -> None:
    with pytest.raises(NotFound, match="Unknown model 'nope'") as e:
        client.log_prob("nope", [[0, 0]])
    assert e.value.status_code == 404


def test_sample_rejects_unknown_version(client: Client) -> None:
    with pytest.raises(NotFound, match=r"no version 9; its versions are \[1\]"):
        client.sample("tiny", 3, version=9)


def test_log_prob_rejects_bad_json(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", content=b'{"model": "tiny", "x": [[0, 1]',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Request body is not valid JSON")


def test_log_prob_rejects_json_that_is_not_an_object(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", json=[[0, 1]])
    assert r.status_code == 422
    assert r.json()["detail"] == "Request body must be a JSON object; got list"


@pytest.mark.parametrize(("content", "content_type", "status", "fragment"), [
    (b"", "application/json", 422, "Request body is empty"),
    (b"x=1", "text/csv", 415, "Unsupported Content-Type 'text/csv'"),
])
def test_log_prob_rejects_an_empty_body_or_an_unsupported_type(
        server: Server, content: bytes, content_type: str, status: int, fragment: str) -> None:
    r = httpx.post(server.url + "/log_prob", content=content,
                   headers={"content-type": content_type})
    assert r.status_code == status
    assert fragment in r.json()["detail"]


def test_log_prob_requires_x_and_model(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", json={"model": "tiny"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("x: field required")
    r = httpx.post(server.url + "/log_prob", json={"x": [[0, 0]]})
    assert r.status_code == 422
    assert "model: Field required" in r.json()["detail"]


def test_sample_rejects_unknown_field_and_bad_n(server: Server) -> None:
    r = httpx.post(server.url + "/sample", json={"model": "tiny", "n": 3, "sed": 1})
    assert r.status_code == 422
    assert "sed: Extra inputs are not permitted" in r.json()["detail"]
    r = httpx.post(server.url + "/sample", json={"model": "tiny", "n": 0})
    assert r.status_code == 422
    assert "n: Input should be greater than or equal to 1" in r.json()["detail"]
    r = httpx.post(server.url + "/sample", json={"model": "tiny", "n": "many"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("n: ")


def test_log_prob_rejects_oversized_body_by_content_length(server: Server) -> None:
    body = b" " * 400_001  # the server's limit is 400000 bytes
    r = httpx.post(server.url + "/log_prob", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == ("Request body of 400001 bytes is over the limit of 400000 "
                                  "bytes")


def test_log_prob_rejects_oversized_streamed_body(server: Server) -> None:
    def chunks():  # no Content-Length: chunked transfer, cut off while streaming
        for _ in range(100):
            yield b" " * 10_000

    r = httpx.post(server.url + "/log_prob", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == "Request body is over the limit of 400000 bytes"


@pytest.mark.parametrize("binary", [False, True])
def test_log_prob_rejects_too_many_rows(client: Client, binary: bool) -> None:
    with pytest.raises(PayloadTooLarge, match="x has 5001 rows; the limit is 5000") as e:
        client.log_prob("tiny", np.zeros((5001, 2), np.float32), binary=binary)
    assert e.value.status_code == 413


def test_sample_rejects_too_large_n(client: Client) -> None:
    with pytest.raises(PayloadTooLarge, match="n = 5001 is over the limit of 5000"):
        client.sample("tiny", 5001)


def test_log_prob_rejects_malformed_safetensors_body(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", params={"model": "tiny"},
                   content=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
                   headers={"content-type": OCTET})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Request body is not a valid safetensors file")


def test_log_prob_rejects_unexpected_and_missing_tensors(server: Server) -> None:
    body = st_save({"y": np.zeros((2, 2), np.float32)})
    r = httpx.post(server.url + "/log_prob", params={"model": "tiny"}, content=body,
                   headers={"content-type": OCTET})
    assert r.status_code == 422
    assert r.json()["detail"] == "Unexpected tensors ['y'] in the body; allowed: ['context', 'x']"
    body = st_save({"context": np.zeros((2, 1), np.float32)})
    r = httpx.post(server.url + "/log_prob", params={"model": "cond"}, content=body,
                   headers={"content-type": OCTET})
    assert r.status_code == 422
    assert r.json()["detail"] == "The safetensors body has no tensor 'x'"


def test_binary_log_prob_needs_model_in_query(server: Server) -> None:
    body = st_save({"x": np.zeros((2, 2), np.float32)})
    r = httpx.post(server.url + "/log_prob", content=body, headers={"content-type": OCTET})
    assert r.status_code == 422
    assert "model: Field required" in r.json()["detail"]


def test_context_errors(client: Client) -> None:
    with pytest.raises(InvalidInput, match="is unconditional; send no context"):
        client.log_prob("tiny", [[0, 0]], context=[[1.0]])
    with pytest.raises(InvalidInput, match=r"needs a context of shape \(1, 1\)"):
        client.log_prob("cond", [[0, 0]])
    with pytest.raises(InvalidInput, match="context has 2 rows; expected 1 or 3"):
        client.log_prob("cond", np.zeros((3, 2)), context=np.zeros((2, 1)))
    with pytest.raises(InvalidInput, match="context has 2 columns; the model expects 1"):
        client.sample("cond", 3, context=[[0.0, 1.0]])


def test_model_name_with_path_characters_is_rejected(server: Server) -> None:
    r = httpx.post(server.url + "/log_prob", json={"model": "../tiny", "x": [[0, 0]]})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("model: String should match pattern")


# ---------------------------------------------------------------------------------- no 500
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20)
_fields = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny", "cond", "tiny3", "nope", "", 3, None]),
    "version": _json_value | st.integers(-2, 3), "x": _json_value
    | st.lists(st.lists(st.floats(), min_size=0, max_size=4), max_size=4),
    "context": _json_value, "n": _json_value | st.integers(-3, 6000), "seed": _json_value})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/log_prob", "/sample"]),
       body=_fields | _json_value.map(lambda v: {"x": v}),
       raw=st.none() | st.binary(max_size=64))
def test_no_input_produces_a_500(app_client, path: str, body: dict, raw: bytes | None) -> None:
    if raw is not None:
        for ctype in ("application/json", OCTET):
            r = app_client.post(path, content=raw, params={"model": "tiny", "n": 2},
                                headers={"content-type": ctype})
            assert r.status_code < 500, r.text
    r = app_client.post(path, content=json.dumps(body), headers={"content-type":
                                                                  "application/json"})
    assert r.status_code < 500, r.text
    assert r.status_code == 200 or "detail" in r.json()


def test_request_past_its_deadline_is_a_fast_503(settings, make_model) -> None:
    from fastapi.testclient import TestClient

    make_model("tiny")
    app = create_app(settings.model_copy(update={"request_timeout_s": 1e-9}))
    with TestClient(app) as c:
        r = c.post("/sample", json={"model": "tiny", "n": 5})
    assert r.status_code == 503
    assert "overloaded" in r.json()["detail"] and "deadline" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"


def test_corrupted_stored_model_is_left_out_of_the_list(app_client, settings) -> None:
    bad = settings.models_dir / "broken" / "1"
    bad.mkdir(parents=True)
    (bad / "model.safetensors").write_bytes(b"garbage")
    r = app_client.get("/models")
    assert r.status_code == 200
    assert "broken" not in {m["name"] for m in r.json()["data"]}
    r = app_client.get("/models/broken")
    assert r.status_code == 404
    assert r.json()["detail"] == "Model 'broken' has no readable version"

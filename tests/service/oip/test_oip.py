"""The Open Inference Protocol v2 routes, driven by the official ``tritonclient[http]`` against a
real uvicorn server: metadata, readiness, infer for both operations with binary data on and off,
and errors as ``{"error": …}``."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.conftest import Server


@pytest.fixture(scope="module")
def tc(server: Server) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def _input(name: str, arr: np.ndarray, binary: bool) -> triton.InferInput:
    dtype = {np.float32: "FP32", np.float64: "FP64"}[arr.dtype.type]
    tensor = triton.InferInput(name, list(arr.shape), dtype)
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


def _expected(server: Server, model: str, x: np.ndarray, context: np.ndarray | None = None
              ) -> np.ndarray:
    flow = server.flows[model]
    with torch.no_grad():
        ctx = None if context is None else torch.as_tensor(context, dtype=flow.dtype)
        return flow.log_prob(torch.tensor(np.array(x), dtype=flow.dtype), ctx).numpy()


def test_server_metadata_and_health(tc: triton.InferenceServerClient) -> None:
    assert tc.is_server_live()
    assert tc.is_server_ready()
    meta = tc.get_server_metadata()
    assert meta["name"] == "nfserve"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata(tc: triton.InferenceServerClient, server: Server) -> None:
    meta = tc.get_model_metadata("cond")
    assert meta["name"] == "cond" and meta["versions"] == ["1"]
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert inputs["x"] == {"name": "x", "datatype": "FP32", "shape": [-1, 2]}
    assert inputs["context"]["shape"] == [-1, 1]
    outputs = {t["name"]: t for t in meta["outputs"]}
    assert outputs["log_prob"]["shape"] == [-1] and outputs["samples"]["shape"] == [-1, 2]
    three = tc.get_model_metadata("tiny3", "1")
    assert [t["name"] for t in three["inputs"]] == ["x"]  # unconditional: no context
    assert three["inputs"][0]["shape"] == [-1, 3]


def test_model_readiness(tc: triton.InferenceServerClient) -> None:
    assert tc.is_model_ready("tiny")
    assert tc.is_model_ready("tiny", "1")
    assert not tc.is_model_ready("no_such_model")
    assert not tc.is_model_ready("tiny", "7")


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_log_prob(tc: triton.InferenceServerClient, server: Server, binary_in: bool,
                        binary_out: bool) -> None:
    x = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    result = tc.infer("tiny", [_input("x", x, binary_in)],
                      outputs=[triton.InferRequestedOutput("log_prob", binary_data=binary_out)],
                      parameters={"op": "log_prob"}, request_id="r1")
    lp = result.as_numpy("log_prob")
    assert lp.shape == (7,) and lp.dtype == np.float32
    np.testing.assert_allclose(lp, _expected(server, "tiny", x), rtol=1e-4, atol=1e-4)
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["model_version"] == "1"
    assert response["id"] == "r1"
    assert response["parameters"]["exact"] is True


def test_infer_fp64_input_and_default_outputs(tc: triton.InferenceServerClient,
                                              server: Server) -> None:
    # No requested outputs: tritonclient asks for every output in binary.
    x = np.random.default_rng(1).normal(size=(4, 3))
    lp = tc.infer("tiny3", [_input("x", x, True)], model_version="1").as_numpy("log_prob")
    np.testing.assert_allclose(lp, _expected(server, "tiny3", x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False])
def test_infer_sample_seeded(tc: triton.InferenceServerClient, server: Server,
                             binary: bool) -> None:
    outs = [triton.InferRequestedOutput("samples", binary_data=binary),
            triton.InferRequestedOutput("log_prob", binary_data=binary)]
    params = {"op": "sample", "n": 50, "seed": 3}
    first = tc.infer("tiny", [], outputs=outs, parameters=params)
    again = tc.infer("tiny", [], outputs=outs, parameters=params)
    samples, log_q = first.as_numpy("samples"), first.as_numpy("log_prob")
    assert samples.shape == (50, 2) and log_q.shape == (50,)
    np.testing.assert_array_equal(samples, again.as_numpy("samples"))
    np.testing.assert_allclose(log_q, _expected(server, "tiny", samples), rtol=1e-3, atol=1e-3)
    # The same seed gives the native API's samples.
    with server.client() as nf:
        native, _ = nf.sample("tiny", 50, seed=3)
    np.testing.assert_allclose(samples, native, rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_infer_conditional(tc: triton.InferenceServerClient, server: Server,
                           binary: bool) -> None:
    x = np.random.default_rng(2).normal(size=(5, 2)).astype(np.float32)
    ctx = np.full((5, 1), 0.5, np.float32)
    lp = tc.infer("cond", [_input("x", x, binary), _input("context", ctx, binary)]
                  ).as_numpy("log_prob")
    np.testing.assert_allclose(lp, _expected(server, "cond", x, ctx), rtol=1e-4, atol=1e-4)
    drawn = tc.infer("cond", [_input("context", ctx[:1], binary)],
                     parameters={"op": "sample", "n": 5, "seed": 0})
    assert drawn.as_numpy("samples").shape == (5, 2)


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_infer_errors(tc: triton.InferenceServerClient) -> None:
    x = np.zeros((2, 2), np.float32)
    cases = [
        (lambda: tc.infer("nope", [_input("x", x, True)]), "404", "nope"),
        (lambda: tc.infer("tiny", [_input("x", x, True)], model_version="9"), "404", "9"),
        (lambda: tc.infer("tiny", [_input("x", np.zeros((2, 3), np.float32), False)]), "400",
         "columns"),
        (lambda: tc.infer("tiny", [_input("x", np.full((2, 2), np.nan, np.float32), True)]),
         "400", "NaN"),
        (lambda: tc.infer("tiny", []), "400", "needs the input 'x'"),
        (lambda: tc.infer("tiny", [], parameters={"op": "sample"}), "400", "'n'"),
        (lambda: tc.infer("tiny", [], parameters={"op": "jump"}), "400", "op"),
        (lambda: tc.infer("tiny", [], parameters={"op": "sample", "n": 10**7}), "413", "limit"),
        (lambda: tc.infer("tiny", [_input("x", x, True)],
                          outputs=[triton.InferRequestedOutput("samples")]), "400", "samples"),
        (lambda: tc.infer("tiny", [_input("y", x, True)]), "400", "'y'"),
        (lambda: tc.infer("cond", [_input("x", x, True)]), "400", "context"),
    ]
    for call, status, words in cases:
        err = _error(call)
        assert err.status() == status, (err.status(), err.message())
        assert words in err.message()


def test_int_datatype_refused(tc: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 2], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 2), np.int32))
    err = _error(lambda: tc.infer("tiny", [tensor]))
    assert err.status() == "400" and "FP32 or FP64" in err.message()


def test_raw_errors_are_oip_shaped(server: Server) -> None:
    url = server.url + "/v2/models/tiny/infer"
    cases = [(b"", 400), (b"not json", 400), (b'{"inputs": 3}', 400),
             (b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1]}]}',
              400)]
    for body, status in cases:
        r = httpx.post(url, content=body)
        assert r.status_code == status
        assert set(r.json()) == {"error"} and r.json()["error"]
    # A binary header longer than the body, and bytes that belong to no input.
    r = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400 and "99" in r.json()["error"]
    head = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'
    r = httpx.post(url, content=head + b"\0" * 8,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "belong to no input" in r.json()["error"]
    r = httpx.get(server.url + "/v2/models/tiny/versions/x1")
    assert r.status_code == 400 and "error" in r.json()
    # An oversized body: the native limit, in the protocol's error shape.
    r = httpx.post(url, content=b"0" * 500_000)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_json_output_layout(server: Server) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64",
                        "data": [[0.0, 0.5], [1.0, -0.3]]}]}
    r = httpx.post(server.url + "/v2/models/tiny/versions/1/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "Inference-Header-Content-Length" not in r.headers
    out = r.json()["outputs"]
    assert out[0]["name"] == "log_prob" and out[0]["shape"] == [2]
    assert out[0]["datatype"] == "FP32" and len(out[0]["data"]) == 2

"""The inference fast path (``service.api.fastpath``) answers exactly as the FastAPI routes do,
and is middleware like any other: what an operator adds with ``app.add_middleware`` covers it.

The same requests, good and bad, go to two in-process apps, one with ``fast_path`` on (the
default) and one with it off; status, headers that matter and bodies must match (byte for byte
for JSON, tensor for tensor for safetensors; seeded samples included), and the metrics must count
the requests either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import pytest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.testclient import TestClient
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from service.api import create_app
from service.api.fastpath import FastPath
from service.api.routes import inference as inference_routes
from service.settings import Settings

from ..conftest import standard_models

OCTET = "application/octet-stream"
X = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)

# (method, path, keyword arguments of TestClient.request)
REQUESTS: list[tuple[str, str, dict]] = [
    ("POST", "/log_prob", {"json": {"model": "tiny", "x": X.tolist()}}),
    ("POST", "/log_prob", {"json": {"model": "tiny", "version": 1, "x": X.tolist()}}),
    ("POST", "/log_prob", {"content": st_save({"x": X}), "params": {"model": "tiny"},
                           "headers": {"content-type": OCTET, "accept": OCTET}}),
    ("POST", "/log_prob", {"json": {"model": "cond", "x": X.tolist(), "context": [0.5]}}),
    ("POST", "/sample", {"json": {"model": "tiny", "n": 5, "seed": 3}}),
    ("POST", "/sample", {"params": {"model": "tiny3", "n": "4", "seed": "9"}}),
    ("POST", "/sample", {"params": {"model": "tiny", "n": "3", "seed": "1"},
                         "headers": {"content-type": OCTET, "accept": OCTET}}),
    # the bad ones
    ("POST", "/log_prob", {"json": {"model": "tiny", "x": [[1, 2, 3]]}}),
    ("POST", "/log_prob", {"content": b'{"model": "tiny", "x": [[NaN, 1]]}',
                           "headers": {"content-type": "application/json"}}),
    ("POST", "/log_prob", {"json": {"model": "tiny", "x": []}}),
    ("POST", "/log_prob", {"json": {"model": "nope", "x": [[1, 2]]}}),
    ("POST", "/log_prob", {"json": {"model": "tiny", "version": 7, "x": [[1, 2]]}}),
    ("POST", "/log_prob", {"content": b'{"model": "tiny", "x": [[1, 2]]',
                           "headers": {"content-type": "application/json"}}),
    ("POST", "/log_prob", {"content": b"", "headers": {"content-type": "application/json"}}),
    ("POST", "/log_prob", {"content": b"x" * 5000, "headers": {"content-type": OCTET},
                           "params": {"model": "tiny"}}),
    ("POST", "/log_prob", {"content": b"not safetensors", "params": {"model": "tiny"},
                           "headers": {"content-type": OCTET}}),
    ("POST", "/log_prob", {"content": b"a,b", "headers": {"content-type": "text/csv"}}),
    ("POST", "/log_prob", {"json": {"model": "tiny", "x": [[1, 2]], "colour": "red"}}),
    ("POST", "/sample", {"json": {"model": "tiny", "n": 0}}),
    ("POST", "/sample", {"json": {"model": "tiny", "n": 10**9}}),
    ("POST", "/sample", {"json": {"model": "../etc", "n": 1}}),
    ("GET", "/log_prob", {}),  # not the fast path's: 405 from the router either way
]


@pytest.fixture
def both(settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps on the same store and settings: the fast path on, and off."""
    standard_models(settings.models_dir)
    settings = settings.model_copy(update={"max_body_bytes": 4096, "max_sample_n": 1000})
    with ExitStack() as stack:
        yield tuple(stack.enter_context(TestClient(create_app(
            settings.model_copy(update={"fast_path": on})))) for on in (True, False))


@pytest.mark.parametrize(("method", "path", "kwargs"), REQUESTS,
                         ids=[f"{i}-{m} {p}" for i, (m, p, _) in enumerate(REQUESTS)])
def test_fast_path_answers_like_the_fastapi_route(both, method: str, path: str,
                                                  kwargs: dict) -> None:
    fast, slow = both
    a, b = fast.request(method, path, **kwargs), slow.request(method, path, **kwargs)
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.headers["content-type"] == b.headers["content-type"]
    assert a.headers.get("retry-after") == b.headers.get("retry-after")
    assert _decoded(a) == _decoded(b)
    if a.status_code >= 400:
        assert a.json()["detail"]  # a message, never an empty error


def _decoded(response) -> object:
    """The body, with a safetensors answer read back (its header's key order is not fixed)."""
    if response.headers["content-type"] != OCTET:
        return response.content
    header_size = int.from_bytes(response.content[:8], "little")
    header = json.loads(response.content[8:8 + header_size])
    tensors = {k: v.tobytes() for k, v in st_load(response.content).items()}
    return header.pop("__metadata__"), tensors


def test_fast_path_answers_are_right(both) -> None:
    """Not only alike: the fast path's answers are the model's (and errors say why)."""
    fast, _ = both
    r = fast.post("/log_prob", content=st_save({"x": X}), params={"model": "tiny"},
                  headers={"content-type": OCTET, "accept": OCTET})
    assert r.status_code == 200
    got = st_load(r.content)["log_prob"]
    assert got.shape == (7,) and np.isfinite(got).all()
    j = fast.post("/log_prob", json={"model": "tiny", "x": X.tolist()}).json()
    np.testing.assert_allclose(j["log_prob"], got, rtol=1e-5)
    r = fast.post("/log_prob", json={"model": "tiny", "x": [[1, 2, 3]]})
    assert r.status_code == 422 and "3 columns" in r.json()["detail"]


def test_fast_path_is_counted_in_metrics(both) -> None:
    fast, _ = both
    fast.post("/log_prob", json={"model": "tiny", "x": X.tolist()})
    fast.post("/log_prob", json={"model": "nope", "x": X.tolist()})
    text = fast.get("/metrics").text
    assert 'nfserve_requests_total{method="POST",route="/log_prob",status="200"} 1.0' in text
    assert 'nfserve_requests_total{method="POST",route="/log_prob",status="404"} 1.0' in text
    assert 'nfserve_request_duration_seconds_count{method="POST",route="/log_prob"} 2.0' in text


@pytest.mark.parametrize("fast_path", [True, False])
def test_fast_path_checks_keys(settings: Settings, fast_path: bool) -> None:
    standard_models(settings.models_dir)
    keyed = settings.model_copy(update={"api_keys_read": ["r-key"], "api_keys_write": ["w-key"],
                                        "fast_path": fast_path})
    with TestClient(create_app(keyed)) as client:
        body = {"model": "tiny", "x": X.tolist()}
        missing = client.post("/log_prob", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Missing API key" in missing.json()["detail"]
        wrong = client.post("/log_prob", json=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "Invalid API key"
        basic = client.post("/sample", json={"model": "tiny", "n": 2},
                            headers={"authorization": "Basic r-key"})
        assert basic.status_code == 401
        for key in ("r-key", "w-key"):
            ok = client.post("/log_prob", json=body, headers={"authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and len(ok.json()["log_prob"]) == 7


def test_middleware_added_later_covers_the_fast_routes(settings: Settings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    standard_models(settings.models_dir)
    app = create_app(settings)
    assert any(m.cls is FastPath for m in app.user_middleware)
    seen: list[tuple[str, str]] = []

    class Spy:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                seen.append((scope["method"], scope["path"]))
            await self.app(scope, receive, send)

    app.add_middleware(CORSMiddleware, allow_origins=["https://example.org"],
                       allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Spy)

    async def not_the_route(*args, **kwargs):  # the answers below must come from the fast path
        raise AssertionError("the FastAPI route answered a fast-path request")

    monkeypatch.setattr(inference_routes, "_adapt", not_the_route)
    origin = {"origin": "https://example.org"}
    with TestClient(app) as client:
        r = client.post("/log_prob", json={"model": "tiny", "x": X.tolist()}, headers=origin)
        assert r.status_code == 200 and len(r.json()["log_prob"]) == 7
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        r = client.post("/sample", json={"model": "tiny", "n": 2}, headers=origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"]
        r = client.post("/log_prob", json={"model": "nope", "x": [[0, 0]]}, headers=origin)
        assert r.status_code == 404 and r.headers["access-control-allow-origin"]
        preflight = client.options("/log_prob", headers={
            **origin, "access-control-request-method": "POST"})
        assert preflight.status_code == 200  # answered by CORS, before the fast path
        text = client.get("/metrics").text
    assert seen.count(("POST", "/log_prob")) == 2 and ("POST", "/sample") in seen
    assert 'nfserve_requests_total{method="POST",route="/sample",status="200"} 1.0' in text

"""Request control against a real server whose batcher waits 1.5 s to fill every batch, even a
lone request's (so requests stay queued long enough to act on them): a request's ``timeout_ms`` drops it unrun with 408, a
client that disconnects has its queued request dropped unrun, the queue's request bound answers
503, and models are warmed up as they load (at start-up for ``preload_models``). The knobs that
need no queue are tested on an in-process app."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from service.api import create_app
from service.client import Client, DeadlineExceeded
from service.settings import Settings
from tests.service.conftest import Server, standard_models, start_server, stop_server

from .metricsupport import scrape, value, wait_for


@pytest.fixture(scope="module")
def slow_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("control"), {
        "NFSERVE_MAX_QUEUE_DELAY_MS": "1500", "NFSERVE_RUN_IDLE_AT_ONCE": "false",
        "NFSERVE_MAX_QUEUED_REQUESTS": "2",
        "NFSERVE_PRELOAD_MODELS": "tiny", "NFSERVE_WARMUP_ROWS": "8"})
    yield srv
    stop_server(srv)


def _rows(srv: Server, model: str) -> float:
    return value(scrape(srv.url), "nv_inference_count", model=model, version="1")


def test_warm_up_at_start_and_at_load(slow_queue: Server) -> None:
    m = scrape(slow_queue.url)  # no inference request yet
    assert value(m, "nfserve_model_warmups_total", model="tiny", version="1") == 1
    assert value(m, "nfserve_model_warmup_seconds", model="tiny", version="1") > 0
    assert value(m, "nfserve_model_cache_size") == 1
    assert value(m, "nv_inference_count", model="tiny", version="1") == 0  # not a request
    with slow_queue.client() as nf:  # a model loaded on demand is warmed before it serves
        nf.log_prob("tiny3", np.zeros((1, 3)))
    assert value(scrape(slow_queue.url), "nfserve_model_warmups_total", model="tiny3",
                 version="1") == 1


def test_timeout_ms_drops_the_request_unrun(slow_queue: Server) -> None:
    with slow_queue.client() as nf:
        nf.log_prob("tiny3", np.zeros((1, 3)))  # loaded
    rows = _rows(slow_queue, "tiny3")
    r = httpx.post(slow_queue.url + "/log_prob",
                   json={"model": "tiny3", "x": [[0.0, 0.0, 0.0]] * 7, "timeout_ms": 100})
    assert r.status_code == 408
    assert "timeout_ms" in r.json()["detail"]
    m = scrape(slow_queue.url)
    assert value(m, "nfserve_batcher_rejected_total", model="tiny3:1", reason="timeout") >= 1
    wait_for(lambda: value(scrape(slow_queue.url), "nfserve_batcher_dropped_total",
                           model="tiny3:1") >= 1, "the batcher to drop the expired request")
    assert _rows(slow_queue, "tiny3") == rows  # its 7 rows never ran
    # The client raises its own error type; OIP takes Triton's timeout (microseconds).
    with Client(slow_queue.url) as nf, pytest.raises(DeadlineExceeded):
        nf._do(nf_sample_call(timeout_ms=50))
    tc = triton.InferenceServerClient(slow_queue.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as info:
        tc.infer("tiny3", [], parameters={"op": "sample", "n": 3}, timeout=50_000)
    assert info.value.status() == "408"
    tc.close()
    assert _rows(slow_queue, "tiny3") == rows


def nf_sample_call(**extra: object):  # a /sample request with extra JSON fields
    from service.client import _Call

    body = orjson.dumps({"model": "tiny3", "n": 5, **extra})
    return _Call("POST", "/sample", lambda r: r.json(), content=body,
                 headers={"content-type": "application/json"})


def test_disconnected_client_is_dropped_before_compute(slow_queue: Server) -> None:
    with slow_queue.client() as nf:
        nf.log_prob("tiny3", np.zeros((1, 3)))
    rows = _rows(slow_queue, "tiny3")
    dropped = value(scrape(slow_queue.url), "nfserve_batcher_dropped_total", model="tiny3:1")
    body = orjson.dumps({"model": "tiny3", "x": [[0.1, 0.2, 0.3]] * 11})
    host, port = slow_queue.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /log_prob HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: value(scrape(slow_queue.url), "nv_inference_pending_request_count",
                           model="tiny3", version="1") == 1, "the request to be queued")
    sock.close()  # gone while its request waits for the batch
    wait_for(lambda: value(scrape(slow_queue.url), "nfserve_batcher_dropped_total",
                           model="tiny3:1") == dropped + 1, "the batcher to drop it")
    assert _rows(slow_queue, "tiny3") == rows  # its 11 rows never ran
    m = scrape(slow_queue.url)
    assert value(m, "nfserve_requests_total", route="/log_prob", method="POST",
                 status="499") >= 1


def test_queue_bound_in_requests(slow_queue: Server) -> None:
    results: list[int] = []

    def post() -> None:
        r = httpx.post(slow_queue.url + "/log_prob", json={"model": "tiny", "x": [[0, 0]]},
                       timeout=30)
        results.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: value(scrape(slow_queue.url), "nv_inference_pending_request_count",
                           model="tiny", version="1") == 2, "two queued requests")
    r = httpx.post(slow_queue.url + "/log_prob", json={"model": "tiny", "x": [[0, 0]]})
    assert r.status_code == 503 and "2 requests already queued" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"
    for t in threads:
        t.join()
    assert results == [200, 200]


@pytest.fixture
def strict_app(tmp_path: Path) -> Iterator[TestClient]:
    models = tmp_path / "models"
    standard_models(models)
    settings = Settings(models_dir=models, data_dir=tmp_path / "data", embedded_worker=False,
                        max_queue_delay_ms=300, allow_timeout_override=False, warmup_rows=0,
                        _env_file=None)
    with TestClient(create_app(settings)) as client:
        yield client


def test_timeout_override_can_be_turned_off(strict_app: TestClient) -> None:
    r = strict_app.post("/log_prob", json={"model": "tiny", "x": [[0, 0]], "timeout_ms": 5})
    assert r.status_code == 200  # the server's own deadline applies, not the request's
    assert "nfserve_model_warmups_total{" not in strict_app.get("/metrics").text


def test_timeout_ms_is_validated(strict_app: TestClient) -> None:
    r = strict_app.post("/log_prob", json={"model": "tiny", "x": [[0, 0]], "timeout_ms": -1})
    assert r.status_code == 422 and "timeout_ms" in r.json()["detail"]

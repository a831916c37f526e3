"""Triton's metric names on /metrics of a real server, after native JSON, native binary and OIP
requests: successes, failures, rows, executions, the three durations and the pending gauge, all
labelled by model and version."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from service.client import InvalidInput
from tests.service.conftest import Server

from .metricsupport import scrape, value

NV = ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
      "nv_inference_exec_count", "nv_inference_request_duration_us",
      "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"]


def test_triton_metrics_after_requests(server: Server) -> None:
    labels = {"model": "tiny3", "version": "1"}
    before = scrape(server.url)
    x = np.random.default_rng(0).normal(size=(10, 3))
    with server.client() as nf:
        nf.log_prob("tiny3", x, binary=False)  # 10 rows, JSON
        nf.log_prob("tiny3", x[:4], binary=True)  # 4 rows, safetensors
        nf.sample("tiny3", 6, seed=1)  # 6 rows
        with pytest.raises(InvalidInput):
            nf.log_prob("tiny3", np.zeros((2, 5)))  # wrong width: a failure
    r = httpx.post(server.url + "/v2/models/tiny3/infer", json={"inputs": [
        {"name": "x", "shape": [5, 3], "datatype": "FP64", "data": x[:5].ravel().tolist()}]})
    assert r.status_code == 200
    after = scrape(server.url)

    def delta(name: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("nv_inference_request_success") == 4
    assert delta("nv_inference_request_failure") == 1
    assert delta("nv_inference_count") == 10 + 4 + 6 + 5
    execs = delta("nv_inference_exec_count")
    assert 1 <= execs <= 4  # the sequential requests ran one pass each, at most
    for name in ("nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us"):
        assert delta(name) > 0, name
    # Kept apart: a request's duration holds its queue and compute time.
    assert delta("nv_inference_request_duration_us") >= delta("nv_inference_queue_duration_us")
    assert value(after, "nv_inference_pending_request_count", **labels) == 0
    text = httpx.get(server.url + "/metrics").text
    for name in NV:  # Triton's exact names: no _total suffix
        assert f'{name}{{model="tiny3",version="1"}}' in text, name

"""Prometheus metrics: requests by route and status, latency, batches, queue depth, model cache;
and a registry per app, so apps never share counters."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in metrics")


def test_metrics_count_requests_by_route_and_status(app_client: TestClient) -> None:
    for _ in range(3):
        assert app_client.post("/log_prob", json={"model": "tiny", "x": [[0, 0]]}
                               ).status_code == 200
    assert app_client.post("/log_prob", json={"model": "nope", "x": [[0, 0]]}).status_code == 404
    assert app_client.get("/models/nope").status_code == 404
    text = app_client.get("/metrics").text
    assert metric(text, "nfserve_requests_total", route="/log_prob", status="200") == 3
    assert metric(text, "nfserve_requests_total", route="/log_prob", status="404") == 1
    assert metric(text, "nfserve_requests_total", route="/models/{name}", status="404") == 1
    assert metric(text, "nfserve_request_duration_seconds_count", route="/log_prob") == 4


def test_metrics_report_batches_queue_and_cache(app_client: TestClient) -> None:
    app_client.post("/log_prob", json={"model": "tiny", "x": [[0, 0], [1, 1], [2, 2]]})
    app_client.post("/sample", json={"model": "tiny", "n": 5})
    app_client.post("/sample", json={"model": "tiny3", "n": 2})
    text = app_client.get("/metrics").text
    assert metric(text, "nfserve_batch_rows_sum", model="tiny:1", kind="log_prob") == 3
    assert metric(text, "nfserve_batch_rows_sum", model="tiny:1", kind="sample") == 5
    assert metric(text, "nfserve_batcher_queue_rows", model="tiny:1") == 0
    assert metric(text, "nfserve_model_cache_size") == 2
    assert metric(text, "nfserve_model_cache_misses_total") == 2
    assert metric(text, "nfserve_model_cache_hits_total") == 1


def test_each_app_has_its_own_registry(app_client: TestClient, settings: Settings) -> None:
    app_client.post("/log_prob", json={"model": "tiny", "x": [[0, 0]]})
    with TestClient(create_app(settings)) as other:
        text = other.get("/metrics").text
    assert 'nfserve_requests_total{method="POST",route="/log_prob"' not in text
    assert 'route="/log_prob"' not in text
    assert metric(app_client.get("/metrics").text, "nfserve_requests_total",
                  route="/log_prob", status="200") == 1


def test_model_cache_is_lru_bounded(models_dir, make_model, tmp_path) -> None:
    for name in ("a", "b", "c"):
        make_model(name)
    app = create_app(Settings(models_dir=models_dir, data_dir=tmp_path, model_cache_size=2,
                              _env_file=None))
    with TestClient(app) as c:
        for name in ("a", "b", "a", "c"):
            assert c.post("/log_prob", json={"model": name, "x": [[0, 0]]}).status_code == 200
        assert app.state.cache.cached == [("a", 1), ("c", 1)]  # b was least recently used
        text = c.get("/metrics").text
    assert metric(text, "nfserve_model_cache_evictions_total") == 1
    assert metric(text, "nfserve_model_cache_size") == 2

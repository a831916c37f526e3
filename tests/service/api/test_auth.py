"""Optional API keys: read scope (score, sample, list, download), write scope (uploads too); health
and metrics stay open. Against a real server started with keys."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import nfcore
from service.client import Client, Forbidden, Unauthorized

from ..conftest import TINY, Server, start_server, stop_server


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("keyed"), {
        "NFSERVE_API_KEYS_READ": "reader-1,reader-2", "NFSERVE_API_KEYS_WRITE": "writer-1"})
    yield srv
    stop_server(srv)


def test_missing_key_is_401(keyed: Server) -> None:
    with Client(keyed.url) as c, pytest.raises(Unauthorized, match="Missing API key") as e:
        c.log_prob("tiny", [[0, 0]])
    assert e.value.status_code == 401


def test_wrong_key_is_401(keyed: Server) -> None:
    with Client(keyed.url, api_key="guess") as c, \
            pytest.raises(Unauthorized, match="Invalid API key"):
        c.models()


def test_malformed_authorization_header_is_401(keyed: Server) -> None:
    r = httpx.get(keyed.url + "/models", headers={"authorization": "Basic abc"})
    assert r.status_code == 401
    assert r.json()["detail"].startswith("Missing API key")


@pytest.mark.parametrize("key", ["reader-2", "writer-1"])
def test_read_and_write_keys_can_score_sample_and_list(keyed: Server, key: str) -> None:
    with Client(keyed.url, api_key=key) as c:
        assert c.log_prob("tiny", [[0, 0]]).shape == (1,)
        assert c.sample("tiny", 2, seed=0)[0].shape == (2, 2)
        assert "tiny" in {m["name"] for m in c.models()}
        assert c.download_model("tiny", 1)[:8]


def test_read_key_cannot_upload(keyed: Server) -> None:
    with Client(keyed.url, api_key="reader-1") as c, \
            pytest.raises(Forbidden, match="read scope only") as e:
        c.upload_model("up", nfcore.saves(nfcore.build(TINY)))
    assert e.value.status_code == 403


def test_write_key_can_upload(keyed: Server) -> None:
    with Client(keyed.url, api_key="writer-1") as c:
        assert c.upload_model("up", nfcore.saves(nfcore.build(TINY)))["version"] >= 1


def test_unauthenticated_upload_is_refused_before_the_body_is_read(keyed: Server) -> None:
    r = httpx.post(keyed.url + "/models", params={"name": "x"}, content=b"\x00" * 10_000)
    assert r.status_code == 401


def test_health_and_metrics_stay_open(keyed: Server) -> None:
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert httpx.get(keyed.url + path).status_code == 200, path


def test_no_keys_configured_means_open(client: Client) -> None:
    assert np.isfinite(client.log_prob("tiny", [[0, 0]])).all()

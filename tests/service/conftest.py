"""Fixtures of the service tests: tiny models in a temporary store, in-process apps, and real
uvicorn servers on a free port of 127.0.0.1 (started with the temporary dirs through environment
variables, waited on with /health/live, and stopped at the end)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import nfcore
from service.api import create_app
from service.client import Client
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

TINY = {"preset": "maf", "dim": 2, "transforms": 2, "hidden": [8]}
TINY3 = {"preset": "realnvp", "dim": 3, "transforms": 2, "hidden": [8]}
COND = {"preset": "maf", "dim": 2, "context_dim": 1, "transforms": 2, "hidden": [8]}

ModelFactory = Callable[..., nfcore.Flow]


def write_model(models_dir: Path, name: str, spec: dict | None = None, *, version: int = 1,
                seed: int = 0, metadata: dict | None = None) -> nfcore.Flow:
    """Build a tiny flow with random (seeded) weights and save it as models_dir/name/version."""
    torch.manual_seed(seed)
    flow = nfcore.build(spec or TINY)
    with torch.no_grad():  # perturb so that versions differ and the density is not trivial
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    nfcore.save(flow, models_dir / name / str(version) / "model.safetensors",
                metadata=metadata or {"training": {"objective": "test", "seed": seed}})
    return nfcore.load(models_dir / name / str(version) / "model.safetensors")


def standard_models(models_dir: Path) -> dict[str, nfcore.Flow]:
    return {"tiny": write_model(models_dir, "tiny", TINY),
            "tiny3": write_model(models_dir, "tiny3", TINY3, seed=1),
            "cond": write_model(models_dir, "cond", COND, seed=2)}


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture
def make_model(models_dir: Path) -> ModelFactory:
    """``make_model(name, spec=None, version=1, seed=0)`` writes a tiny model into the store."""
    def make(name: str, spec: dict | None = None, **kw: object) -> nfcore.Flow:
        return write_model(models_dir, name, spec, **kw)
    return make


@pytest.fixture
def settings(models_dir: Path, tmp_path: Path) -> Settings:
    return Settings(models_dir=models_dir, data_dir=tmp_path / "data", embedded_worker=False,
                    _env_file=None)


@pytest.fixture
def app_client(settings: Settings, make_model: ModelFactory) -> Iterator[TestClient]:
    """An in-process app (``with TestClient``) with the standard tiny models."""
    standard_models(settings.models_dir)
    with TestClient(create_app(settings)) as client:
        yield client


# ---------------------------------------------------------------------------------- real servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    models_dir: Path
    process: subprocess.Popen
    flows: dict[str, nfcore.Flow]
    api_keys: dict[str, str]

    def client(self, **kw: object) -> Client:
        return Client(self.url, **kw)


def start_server(root: Path, env: dict[str, str] | None = None) -> Server:
    models = root / "models"
    models.mkdir(parents=True)
    flows = standard_models(models)
    port = free_port()
    full_env = {**os.environ, "NFSERVE_MODELS_DIR": str(models),
                "NFSERVE_DATA_DIR": str(root / "data"), "NFSERVE_EMBEDDED_WORKER": "false",
                "PYTHONPATH": str(ROOT), **(env or {})}
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # startup wait (imports torch): poll, then give up with the log
        if process.poll() is not None:
            break
        try:
            if httpx.get(url + "/health/live", timeout=1).status_code == 200:
                keys = {k: v for k, v in (env or {}).items() if k.startswith("NFSERVE_API_KEYS")}
                return Server(url, models, process, flows, keys)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start:\n{(root / 'server.log').read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real uvicorn process with small limits (to test them cheaply) and batching on, with a
    queue delay long enough that concurrent requests really share batches."""
    srv = start_server(tmp_path_factory.mktemp("server"), {
        "NFSERVE_MAX_ROWS": "5000", "NFSERVE_MAX_SAMPLE_N": "5000",
        "NFSERVE_MAX_BODY_BYTES": "400000", "NFSERVE_MAX_UPLOAD_BYTES": "200000",
        "NFSERVE_MAX_QUEUE_DELAY_MS": "20", "NFSERVE_MAX_BATCH_ROWS": "4096",
        "NFSERVE_STORE_REFRESH_S": "0"})  # tests write versions to disk and expect them at once
    yield srv
    stop_server(srv)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c

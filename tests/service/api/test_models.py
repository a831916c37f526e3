"""The /models routes: list, describe (with diagnostics), download, upload and plot."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import nfcore
from service.client import Client, Conflict, InvalidInput, NotFound, PayloadTooLarge

from ..conftest import TINY, Server


# ---------------------------------------------------------------------------------- routes
def test_list_models(client: Client) -> None:
    models = {m["name"]: m for m in client.models()}
    assert {"tiny", "tiny3", "cond"} <= set(models)
    assert models["tiny3"]["dim"] == 3 and models["tiny3"]["latest"] == 1
    assert models["cond"]["context_dim"] == 1


def test_read_model_shows_spec_metadata_and_hash(client: Client) -> None:
    info = client.model("tiny")
    assert info["name"] == "tiny" and info["latest"] == 1
    v = info["versions"][0]
    assert v["spec"]["dim"] == 2 and v["spec"]["layers"]
    assert v["metadata"]["training"] == {"objective": "test", "seed": 0}
    assert v["hash"].startswith("sha256:") and v["size_bytes"] > 0
    assert v["artifact_url"] == "/models/tiny/versions/1/artifact"


def test_read_unknown_model_is_404(client: Client) -> None:
    with pytest.raises(NotFound, match="Unknown model 'ghost'"):
        client.model("ghost")
    with pytest.raises(NotFound, match="no version 4"):
        client.download_model("tiny", 4)


def test_download_artifact_is_the_stored_file(server: Server, client: Client) -> None:
    data = client.download_model("tiny", 1)
    assert data == (server.models_dir / "tiny" / "1" / "model.safetensors").read_bytes()
    assert nfcore.loads(data).dim == 2


def test_upload_stores_next_version_and_serves_it(server: Server, client: Client) -> None:
    torch.manual_seed(5)
    flow = nfcore.build(TINY)
    data = nfcore.saves(flow, metadata={"note": "uploaded"})
    first = client.upload_model("uploaded", data)
    assert first["version"] == 1 and first["dim"] == 2
    second = client.upload_model("uploaded", data)
    assert second["version"] == 2
    assert (server.models_dir / "uploaded" / "2" / "model.safetensors").read_bytes() == data
    x = np.array([[0.1, 0.2]])
    with torch.inference_mode():
        want = flow.log_prob(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(client.log_prob("uploaded", x), want, rtol=1e-5)


def test_upload_to_existing_version_conflicts(client: Client) -> None:
    data = nfcore.saves(nfcore.build(TINY))
    client.upload_model("pinned", data, version=5)
    with pytest.raises(Conflict, match="already has a version 5") as e:
        client.upload_model("pinned", data, version=5)
    assert e.value.status_code == 409


def test_upload_rejects_malformed_file(client: Client) -> None:
    with pytest.raises(InvalidInput, match="Malformed model upload: Truncated"):
        client.upload_model("bad", b"\x00\x01")
    good = bytearray(nfcore.saves(nfcore.build(TINY)))
    good[-3] ^= 0xFF  # flip weight bytes: the content hash no longer matches
    with pytest.raises(InvalidInput, match="content hash"):
        client.upload_model("bad", bytes(good))
    with pytest.raises(InvalidInput, match="Upload is empty"):
        client.upload_model("bad", b"")
    with pytest.raises(NotFound):
        client.model("bad")  # nothing was stored


def test_multipart_upload_stores_and_serves_the_model(server: Server, client: Client) -> None:
    """``curl -F file=@model.safetensors``: the form field ``file`` is the model."""
    torch.manual_seed(6)
    flow = nfcore.build(TINY)
    data = nfcore.saves(flow)
    r = httpx.post(server.url + "/models", params={"name": "formed"},
                   files={"file": ("model.safetensors", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    assert (server.models_dir / "formed" / "1" / "model.safetensors").read_bytes() == data
    x = np.array([[0.3, -0.2]])
    with torch.inference_mode():
        want = flow.log_prob(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(client.log_prob("formed", x), want, rtol=1e-5)


def test_multipart_upload_errors_are_422(server: Server, client: Client) -> None:
    data = nfcore.saves(nfcore.build(TINY))
    no_file = httpx.post(server.url + "/models", params={"name": "formless"},
                         files={"model": ("model.safetensors", data)})
    assert no_file.status_code == 422
    assert "form field 'file'" in no_file.json()["detail"]
    broken = httpx.post(server.url + "/models", params={"name": "formless"}, content=b"--xyz\r\n",
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert broken.status_code == 422
    assert broken.json()["detail"].startswith(("Malformed multipart upload",
                                               "multipart upload: expected a file"))
    bad_model = httpx.post(server.url + "/models", params={"name": "formless"},
                           files={"file": ("model.safetensors", data[:-5])})
    assert bad_model.status_code == 422
    assert "Malformed model upload" in bad_model.json()["detail"]
    with pytest.raises(NotFound):
        client.model("formless")  # nothing was stored


def test_upload_rejects_oversized_file(client: Client) -> None:
    with pytest.raises(PayloadTooLarge, match="Upload of 200001 bytes is over the limit"):
        client.upload_model("big", b"\x00" * 200_001)


def test_upload_rejects_bad_name(server: Server) -> None:
    r = httpx.post(server.url + "/models", params={"name": "../etc"}, content=b"x")
    assert r.status_code == 422
    assert r.json()["detail"].startswith("query.name: String should match pattern")


def test_plot_of_a_2d_model_is_a_png(client: Client) -> None:
    png = client.plot("tiny", n=200, grid=32)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_3d_model_is_refused(client: Client) -> None:
    with pytest.raises(InvalidInput, match="model tiny3:1 has dim 3"):
        client.plot("tiny3")


def test_serve_command_serves_the_repository_models(tmp_path: Path) -> None:
    """``nfserve serve`` from the repository root serves ``models/`` (the demo models) at once."""
    import os
    import subprocess
    import sys
    import time

    from ..conftest import ROOT, free_port

    demo = sorted(p.parent.parent.name for p in (ROOT / "models").glob("*/*/model.safetensors"))
    if not demo:
        pytest.skip("no models in the repository's models/ yet")
    port = free_port()
    env = {**os.environ, "NFSERVE_EMBEDDED_WORKER": "false", "NFSERVE_DATA_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    env.pop("NFSERVE_MODELS_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        with Client(f"http://127.0.0.1:{port}") as c:
            for _ in range(600):
                try:
                    c.live()
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "serve exited"
                    time.sleep(0.1)
            served = {m["name"]: m for m in c.models()}
            assert set(demo) <= set(served)
            name = demo[0]
            x = np.zeros((3, served[name]["dim"]))
            assert np.isfinite(c.log_prob(name, x)).all()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

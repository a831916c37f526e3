"""A variational job on a model in the model language, end to end: submission checks name the
field and position; a real ``nfserve serve`` trains it, then serves /sample in the constrained
space with named columns, log q there and the model's log density, and /log_prob on named
values; a fresh API process rebuilds the target from the artifact alone (no code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import nfcore
from nfcore import targets
from service.client import Client, InvalidInput

from ..jobsupport import Deployment, deployment, wait_job

__all__ = ["deployment"]  # the fixture, imported for the tests below

torch.set_num_threads(1)

#: Parameters declared out of alphabetical order (their order is the layout of z), a lower bound,
#: and derived quantities, also out of order.
MODEL = {"params": {"scale": {"lower": 0}, "loc": {}},
         "data": {"y": [1.2, 0.4, 2.1, 1.7, 0.9, 1.4]},
         "log_prob": ["lognormal_lpdf(scale, 0, 1)", "normal_lpdf(loc, 0, 5)",
                      "normal_lpdf(y, loc, scale)"],
         "derived": {"var": "square(scale)", "snr": "loc / scale"}}
COLUMNS = ["scale", "loc", "var", "snr"]
FLOW = {"preset": "maf", "dim": 2, "transforms": 2, "hidden": [8]}


def job(target: dict, name: str = "posterior", flow: dict | None = None) -> dict:
    return {"name": name, "flow": flow or FLOW,
            "objective": {"kind": "variational", "target": target},
            "training": {"steps": 40, "batch_size": 64}}


@pytest.mark.parametrize(("change", "message"), [
    ({"log_prob": ["lognormal_lpdf(scale, 0, 1)", "normal_lpdf(y, lco, scale)"]},
     "objective.target: log_prob[1]: Unknown name 'lco'; known names: scale, loc, y at line 1, "
     "column 15"),
    ({"derived": {"var": "square(scale) +"}}, "derived.var"),
    ({"params": {"scale": {"lower": 0, "constraint": "simplex"}, "loc": {}}},
     "params.scale"),
    ({"params": {"scale": {"lower": "zero"}, "loc": {}}}, "params.scale.lower"),
    ({"params": {"scale": {"lower": 0}, "loc": {}, "extra": {"shape": [3]}}},
     "the model has 5 unconstrained reals (scale: 1, loc: 1, extra: 3); the flow has dim 2"),
    ({"log_prob": None}, "objective.variational.target.model.log_prob"),
    ({"prior": {}}, "objective.variational.target.model.prior"),
])
def test_bad_models_are_refused_with_422_naming_field_and_position(
        api: TestClient, change: dict, message: str) -> None:
    target = {k: v for k, v in {**MODEL, **change}.items() if v is not None}
    r = api.post("/train", json=job(target))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert api.get("/jobs").json()["count"] == 0


def test_model_job_trains_serves_named_columns_and_survives_a_restart(
        deployment: Deployment) -> None:
    api = deployment.start_api(embedded_worker=True)
    with Client(api.url) as client:
        accepted = client.train("posterior", FLOW, {"kind": "variational", "target": MODEL},
                                {"steps": 60, "batch_size": 64, "seed": 3})
        done = wait_job(client, accepted["job_id"], deployment)
        assert done["status"] == "succeeded", done
        assert done["result"]["model"] == "posterior" and done["result"]["diagnostics"]
        assert done["objective"]["target"] == MODEL  # as given, nothing added

        # the model page names the columns and the parameters
        version = client.model("posterior")["versions"][0]
        assert version["target"]["columns"] == COLUMNS
        assert list(version["target"]["params"]) == ["scale", "loc"]

        # /sample: constrained, named, derived quantities included
        draws = client.draws("posterior", 400, seed=11)
        assert draws.columns == COLUMNS and draws.samples.shape == (400, 4)
        named = draws.named()
        assert (named["scale"] > 0).all()
        np.testing.assert_allclose(named["var"], named["scale"] ** 2, rtol=1e-9)
        np.testing.assert_allclose(named["snr"], named["loc"] / named["scale"], rtol=1e-9)
        # ... the model's density at the same points, as the Target computes it in-process
        target = targets.from_spec(MODEL)
        values = torch.as_tensor(draws.samples[:, :2], dtype=torch.float64)
        np.testing.assert_allclose(draws.target_log_prob, target.target_log_prob(values).numpy(),
                                   rtol=1e-9, atol=1e-9)
        # ... and log q in the constrained space, which /log_prob gives back for named values
        lp = client.log_prob("posterior", values={"scale": named["scale"], "loc": named["loc"]})
        np.testing.assert_allclose(lp, draws.log_prob, rtol=1e-4, atol=1e-4)
        # which is the flow's log q at z = (log scale, loc) minus log scale (change of variables)
        flow = nfcore.load(deployment.models_dir / "posterior" / "1" / "model.safetensors")
        z = torch.as_tensor(np.column_stack([np.log(named["scale"]), named["loc"]]),
                            dtype=torch.float32)
        with torch.inference_mode():
            direct = flow.log_prob(z).double().numpy() - np.log(named["scale"])
        np.testing.assert_allclose(draws.log_prob, direct, rtol=1e-4, atol=1e-4)
        assert np.isfinite(draws.log_weights).all()

        # the binary answer carries the same tensors and the column names
        binary = client.draws("posterior", 400, seed=11, binary=True)
        assert binary.columns == COLUMNS
        np.testing.assert_allclose(binary.samples, draws.samples, rtol=1e-12)
        np.testing.assert_allclose(binary.target_log_prob, draws.target_log_prob, rtol=1e-12)

        # bad named input: 4xx naming the parameter
        with pytest.raises(InvalidInput, match=r"values\.scale: row 1 is outside"):
            client.log_prob("posterior", values={"scale": [1.0, -2.0], "loc": [0.0, 0.0]})
        with pytest.raises(InvalidInput, match=r"values\.loc: missing"):
            client.log_prob("posterior", values={"scale": [1.0]})

    # the artifact alone: a fresh API process, no worker, no job store entry needed
    meta = nfcore.read_metadata(deployment.models_dir / "posterior" / "1" / "model.safetensors")
    assert list(json.loads(meta["target"])["params"]) == ["scale", "loc"]
    api.stop()
    fresh = deployment.start_api(embedded_worker=False)
    with Client(fresh.url) as client:
        again = client.draws("posterior", 400, seed=11)
        assert again.columns == COLUMNS
        np.testing.assert_allclose(again.samples, draws.samples, rtol=1e-12)
        np.testing.assert_allclose(again.log_prob, draws.log_prob, rtol=1e-12)
        np.testing.assert_allclose(
            client.log_prob("posterior", values={"scale": named["scale"], "loc": named["loc"]}),
            lp, rtol=1e-12)

"""An amortized variational job end to end: a model with a ``context`` block and its contexts
(inline or an uploaded dataset) train one conditional flow on a real ``nfserve serve``; then
``/sample`` with a context (a row or named values) answers that observation's posterior with
named columns, ``log_prob`` and ``target_log_prob``, and ``/log_prob`` takes the context too.
Context errors are 422s that name the problem."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from nfcore import targets
from service.client import Client, InvalidInput

from ..jobsupport import Deployment, deployment, wait_job

__all__ = ["deployment"]

torch.set_num_threads(1)

# theta ~ N(0, 0.5^2 I), x | theta ~ N(theta, 0.5^2 I): the posterior is N(x / 2, 0.125 I).
MODEL = {"params": {"theta": {"shape": [2]}}, "context": {"x": {"shape": [2]}},
         "log_prob": ["normal_lpdf(theta, 0, 0.5)", "normal_lpdf(x, theta, 0.5)"],
         "derived": {"gap": "x - theta"}}
POST_SD = 0.125 ** 0.5
FLOW = {"preset": "realnvp", "dim": 2, "context_dim": 2, "transforms": 3, "hidden": [32, 32]}


def contexts(n: int, seed: int = 0) -> list[list[float]]:
    g = np.random.default_rng(seed)
    theta = 0.5 * g.standard_normal((n, 2))
    return (theta + 0.5 * g.standard_normal((n, 2))).tolist()


def job(objective: dict, flow: dict | None = None) -> dict:
    return {"name": "amortized", "flow": flow or FLOW, "objective": objective,
            "training": {"steps": 20, "batch_size": 32}}


@pytest.mark.parametrize(("objective", "flow", "message"), [
    ({"target": MODEL}, None, "objective.contexts: the model has a 'context' block (rows of 2"),
    ({"target": MODEL, "contexts": [[0.0, 1.0, 2.0]]}, None,
     "objective.contexts: rows of 3 numbers; the model's context rows have 2"),
    ({"target": MODEL, "contexts": [[0.0, None]]}, None, "objective.contexts"),
    ({"target": MODEL, "contexts": {"dataset": "ds_missing"}}, None,
     "objective.contexts.dataset: unknown dataset 'ds_missing'"),
    ({"target": MODEL, "contexts": {"rows": 3}}, None, "got keys ['rows']"),
    ({"target": MODEL, "contexts": [[0.0, 1.0]]}, {**FLOW, "context_dim": 3},
     "flow.context_dim: the model's context rows have 2 numbers (x[0], x[1]); the flow has "
     "context_dim 3"),
    ({"target": {"builtin": "banana"}, "contexts": [[0.0, 1.0]]},
     {"preset": "maf", "dim": 2}, "objective.contexts: the target has no 'context' block"),
    ({"target": {**MODEL, "context": {"x": {"shape": [0]}}}, "contexts": [[0.0, 1.0]]}, None,
     "context.x.shape"),
])
def test_amortized_jobs_are_checked_at_submission(api: TestClient, objective: dict,
                                                  flow: dict | None, message: str) -> None:
    r = api.post("/train", json=job({"kind": "variational", **objective}, flow))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"], r.json()["detail"]
    assert api.get("/jobs").json()["count"] == 0


def test_amortized_job_serves_each_observations_posterior(deployment: Deployment) -> None:
    api = deployment.start_api(embedded_worker=True)
    with Client(api.url) as client:
        # contexts from an uploaded dataset (its rows are the context rows)
        dataset = client.upload_dataset(np.asarray(contexts(400)))
        accepted = client.train("amortized", FLOW, {"kind": "variational", "target": MODEL,
                                                     "contexts": {"dataset": dataset["id"]}},
                                {"steps": 400, "batch_size": 128, "lr": 0.01, "seed": 2})
        done = wait_job(client, accepted["job_id"], deployment)
        assert done["status"] == "succeeded", done
        diagnostics = done["result"]["diagnostics"]
        assert diagnostics["held_out"] and diagnostics["contexts"] == 32
        assert "ok_share" in diagnostics and diagnostics["pareto_k"] is not None
        assert diagnostics["pareto_k_median"] <= diagnostics["pareto_k"]

        # /sample at a new observation: its posterior, named columns, the model's density there
        x = [0.8, -0.6]
        draws = client.draws("amortized", 4000, seed=1, context=x)
        assert draws.columns == ["theta[0]", "theta[1]", "gap[0]", "gap[1]"]
        theta = draws.samples[:, :2]
        # a short fit: within 0.3 posterior sd of the exact mean x / 2, sd within 25 %
        assert np.abs(theta.mean(0) - np.asarray(x) / 2).max() < 0.3 * POST_SD, theta.mean(0)
        assert np.abs(theta.std(0) / POST_SD - 1).max() < 0.25, theta.std(0)
        # (the context reaches the model as the flow's float32)
        np.testing.assert_allclose(draws.samples[:, 2:], np.asarray(x) - theta, atol=1e-6)
        target = targets.from_spec(MODEL)
        expected = target.target_log_prob(torch.as_tensor(theta), [x]).numpy()
        np.testing.assert_allclose(draws.target_log_prob, expected, rtol=1e-6, atol=1e-6)
        assert np.isfinite(draws.log_weights).all()

        # named context values give the same answer as the row
        answers = [httpx.post(api.url + "/sample", json={"model": "amortized", "n": 5,
                                                         "seed": 1, "context": context})
                   for context in ({"x": x}, x)]
        assert [a.status_code for a in answers] == [200, 200], answers[0].text
        np.testing.assert_array_equal(*(np.asarray(a.json()["samples"]) for a in answers))

        # /log_prob at the same context scores the draws as /sample did
        lp = client.log_prob("amortized", np.ascontiguousarray(theta[:50]), context=x)
        np.testing.assert_allclose(lp, draws.log_prob[:50], rtol=1e-4, atol=1e-4)

        # context errors: a 422 naming the problem
        with pytest.raises(InvalidInput, match="context"):
            client.draws("amortized", 3, context=[0.1, 0.2, 0.3])
        for body, message in (({"x": [1.0]}, "context.x: expected shape [2]"),
                              ({"y": [1.0, 2.0]}, "context: missing ['x']"),
                              ({"x": [1.0, 2.0], "z": 1}, "context: unknown ['z']")):
            r = httpx.post(api.url + "/sample", json={"model": "amortized", "n": 3,
                                                      "context": body})
            assert r.status_code == 422 and message in r.json()["detail"], r.text
        r = httpx.post(api.url + "/sample", content=b'{"model": "amortized", "n": 3, '
                       b'"context": [NaN, 1.0]}', headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
        r = httpx.post(api.url + "/sample", json={"model": "amortized", "n": 3})
        assert r.status_code == 422 and "needs a context" in r.json()["detail"], r.text

    # inline contexts work too
    with Client(api.url) as client:
        accepted = client.train("inline", FLOW, {"kind": "variational", "target": MODEL,
                                                 "contexts": contexts(20)},
                                {"steps": 5, "batch_size": 16})
        assert wait_job(client, accepted["job_id"], deployment)["status"] == "succeeded"

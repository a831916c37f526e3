"""``/sample`` with ``diagnose``: the diagnostics of the answered draws themselves, as importance
samples of the model they were fit to, so that a client can tell, query by query (for an
amortized posterior: observation by observation), whether to trust an answer. Against a real
server: a fitted posterior is ``ok`` and an unfitted flow of the same model is ``unreliable``,
JSON and binary, and the numbers are the engine's for the draws answered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nfcore
from nfcore import targets
from nfcore.train import MIN_DIAGNOSED_DRAWS, diagnose_draws
from service.client import InvalidInput as ClientInvalidInput
from service.client import NotFound

from ..conftest import Server, write_model

pytestmark = pytest.mark.usefixtures("one_thread")

#: A Gaussian posterior (conjugate), so that a short fit from the Pathfinder start is exact.
MODEL = {"params": {"mu": {"shape": [2]}},
         "data": {"y": [[1.2, -0.4], [0.8, 0.1], [1.5, -0.2], [1.1, 0.3]]},
         "log_prob": ["normal_lpdf(mu, 0, 5)", "normal_lpdf(y, mu, 0.5)"]}
#: Its amortized twin: the observation is a context.
AMORTIZED = {"params": {"mu": {"shape": [2]}}, "context": {"y": {"shape": [2]}},
             "log_prob": ["normal_lpdf(mu, 0, 1)", "normal_lpdf(y, mu, 0.5)"]}
FLOW = {"preset": "maf", "dim": 2, "transforms": 2, "hidden": [8]}
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _publish(models_dir: Path, name: str, flow: nfcore.Flow, model: dict) -> None:
    spec = targets.from_spec(model).spec
    nfcore.save(flow, models_dir / name / "1" / "model.safetensors",
                metadata={"target": json.dumps(spec)})


def _expected(d) -> dict:
    return diagnose_draws(torch.from_numpy(d.samples), torch.from_numpy(d.log_prob),
                          torch.from_numpy(d.target_log_prob))


def test_diagnose_tells_a_fitted_posterior_from_an_unfitted_one(server: Server) -> None:
    target = targets.from_spec(MODEL)
    torch.manual_seed(0)
    fitted = nfcore.build(FLOW)
    nfcore.fit_target(fitted, target, steps=50, seed=0)
    _publish(server.models_dir, "diag_fitted", fitted, MODEL)
    write_model(server.models_dir, "diag_unfitted", FLOW,
                metadata={"target": json.dumps(target.spec)})
    with server.client() as c:
        good = c.draws("diag_fitted", 2000, seed=1, diagnose=True)
        good_binary = c.draws("diag_fitted", 2000, seed=1, diagnose=True, binary=True)
        bad = c.draws("diag_unfitted", 2000, seed=1, diagnose=True)
        plain = c.draws("diag_fitted", 2000, seed=1)
    assert good.diagnostics["verdict"] == "ok", good.diagnostics
    assert bad.diagnostics["verdict"] == "unreliable", bad.diagnostics
    assert bad.diagnostics["reasons"] and bad.diagnostics["ess_fraction"] < 0.1  # q is far too wide
    assert good_binary.diagnostics == good.diagnostics  # the safetensors answer's metadata
    assert plain.diagnostics is None  # only when asked
    for d in (good, bad):  # the engine's figures for exactly the draws answered
        expected = _expected(d)
        for key in ("pareto_k", "ess_fraction", "moment_shift", "max_weight"):
            assert d.diagnostics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
        assert d.diagnostics["verdict"] == expected["verdict"]


def test_diagnose_judges_each_observation_of_an_amortized_posterior(server: Server) -> None:
    """An untrained conditional flow of an amortized model: each context's answer carries its own
    diagnostics, computed against that observation's posterior."""
    torch.manual_seed(0)
    flow = nfcore.build({**FLOW, "context_dim": 2})
    _publish(server.models_dir, "diag_amortized", flow, AMORTIZED)
    with server.client() as c:
        near = c.draws("diag_amortized", 1000, seed=2, context=[0.1, -0.2],
                       diagnose=True)
        far = c.draws("diag_amortized", 1000, seed=2, context=[9.0, -9.0],
                      diagnose=True)
    for d in (near, far):
        assert d.diagnostics["verdict"] == _expected(d)["verdict"]
    # The posterior of y = (9, -9) sits near (7.2, -7.2), far from where this q puts its mass.
    assert far.diagnostics["verdict"] == "unreliable"
    assert far.diagnostics["pareto_k"] > near.diagnostics["pareto_k"]


def test_diagnose_asks_for_a_target_and_enough_draws(server: Server) -> None:
    write_model(server.models_dir, "diag_plain", FLOW)
    _publish(server.models_dir, "diag_model", nfcore.build(FLOW), MODEL)
    with server.client() as c:
        with pytest.raises(ClientInvalidInput) as plain:
            c.draws("diag_plain", 500, diagnose=True)
        with pytest.raises(ClientInvalidInput) as few:
            c.draws("diag_model", MIN_DIAGNOSED_DRAWS - 1, diagnose=True)
        with pytest.raises(NotFound):
            c.draws("diag_no_such_model", 500, diagnose=True)
        few_binary = c.http.post("/sample", params={"model": "diag_model", "n": 5,
                                                     "diagnose": "true"},
                                    headers={"content-type": "application/octet-stream"})
        ok = c.draws("diag_model", MIN_DIAGNOSED_DRAWS, diagnose=True)
    assert plain.value.status_code == 422
    assert "was not fit to a target" in plain.value.detail
    assert few.value.status_code == 422 and f"n >= {MIN_DIAGNOSED_DRAWS}" in few.value.detail
    assert few_binary.status_code == 422 and "diagnose needs" in few_binary.text
    assert ok.diagnostics["verdict"] in ("ok", "check", "unreliable")
    assert np.isfinite(ok.diagnostics["ess_fraction"])


def test_cli_sample_diagnose_prints_the_verdict_local_and_remote(
        server: Server, capsys: pytest.CaptureFixture) -> None:
    """``nfserve sample --diagnose``: the CSV on stdout as before, the diagnostics as JSON on
    stderr, from the local store and from a server alike; a plain model is an error."""
    from service.cli import main

    target = targets.from_spec(MODEL)
    torch.manual_seed(0)
    fitted = nfcore.build(FLOW)
    nfcore.fit_target(fitted, target, steps=50, seed=0)
    _publish(server.models_dir, "cli_fitted", fitted, MODEL)
    write_model(server.models_dir, "cli_plain", FLOW)
    verdicts = []
    for where in (["--models-dir", str(server.models_dir)], ["--url", server.url]):
        assert main(["sample", "cli_fitted", "-n", "1000", "--seed", "3", "--diagnose",
                     *where]) == 0
        out, err = capsys.readouterr()
        assert out.splitlines()[0].split(",") == ["mu[0]", "mu[1]", "log_prob",
                                                  "target_log_prob"]
        assert len(out.splitlines()) == 1001
        verdicts.append(json.loads(err)["diagnostics"]["verdict"])
        assert main(["sample", "cli_plain", "-n", "1000", "--diagnose", *where]) == 2
        assert "was not fit to a target" in capsys.readouterr().err
    assert verdicts == ["ok", "ok"]


def test_diagnose_scores_a_builtin_target_named_in_the_training_summary(
        server: Server, capsys: pytest.CaptureFixture) -> None:
    """A model a variational job fit to a built-in target (the demo models u1-u4) keeps a plain
    flow's answer and gets diagnostics against that target; an unknown name or a target of
    another dimension is a 422, as a flow fit to data is."""
    from service.cli import main

    u1 = targets.get("U1")
    # The shipped demo model u1, fit to U1 by a variational job (its summary names the target).
    shutil.copytree(ROOT / "models" / "u1", server.models_dir / "builtin_u1")
    summary = {"objective": "variational", "target": "U1"}
    write_model(server.models_dir, "builtin_unknown", FLOW,
                metadata={"training": {"objective": "variational", "target": "no_such_target"}})
    write_model(server.models_dir, "builtin_wrong_dim", {"preset": "maf", "dim": 3},
                metadata={"training": summary})
    with server.client() as c:
        d = c.draws("builtin_u1", 2000, seed=4, diagnose=True)
        b = c.draws("builtin_u1", 2000, seed=4, diagnose=True, binary=True)
        errors = []
        for name in ("builtin_unknown", "builtin_wrong_dim"):
            with pytest.raises(ClientInvalidInput) as e:
                c.draws(name, 500, diagnose=True)
            errors.append(e.value)
    assert d.columns is None and d.target_log_prob is None  # still a plain flow's answer
    x = torch.from_numpy(d.samples)
    expected = diagnose_draws(x, torch.from_numpy(d.log_prob), u1.log_prob(x.double()))
    assert d.diagnostics["verdict"] == expected["verdict"] == "ok", d.diagnostics
    assert d.diagnostics["pareto_k"] == pytest.approx(expected["pareto_k"], abs=1e-5)
    assert b.diagnostics == d.diagnostics
    assert all(e.status_code == 422 and "was not fit to a target" in e.detail for e in errors)
    # the command line, from the local store, says the same
    assert main(["sample", "builtin_u1", "-n", "2000", "--seed", "4", "--diagnose",
                 "--models-dir", str(server.models_dir)]) == 0
    assert json.loads(capsys.readouterr().err)["diagnostics"]["verdict"] == "ok"

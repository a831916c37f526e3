"""Training loops: maximum likelihood and reverse KL, determinism, checkpoint/resume, cancellation,
progress, early stopping and argument checks. Small flows and few steps keep this file fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import nfcore
from nfcore.errors import ShapeError, TargetError, TrainingCancelled
from nfcore.train import FitResult, Progress, TrainingDiverged, load_checkpoint
from nfcore.train.density import split

SPEC = {"preset": "nsf", "dim": 2, "transforms": 2, "hidden": [16, 16], "bins": 4}
#: A resumed run repeats the uninterrupted run's arithmetic exactly; we allow float32 round-off.
RESUME_TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _flow(seed: int = 0, **spec) -> nfcore.Flow:
    torch.manual_seed(seed)
    return nfcore.build({**SPEC, **spec})


def _data(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    x[:, 1] = 0.8 * x[:, 0] + 0.6 * x[:, 1]
    return (x * [30.0, 0.2] + [100.0, -5.0]).astype(np.float32)


def _true_log_prob(x: np.ndarray) -> np.ndarray:
    cov = np.array([[1.0, 0.8], [0.8, 1.0]]) * np.outer([30.0, 0.2], [30.0, 0.2])
    d = x - [100.0, -5.0]
    quad = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
    return -0.5 * quad - 0.5 * np.log(np.linalg.det(cov)) - np.log(2 * np.pi)


def _max_diff(a: nfcore.Flow, b: nfcore.Flow) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


# --------------------------------------------------------------------------- maximum likelihood
def test_fit_density_learns_in_data_units_and_fits_standardize_first():
    data = _data()
    flow = _flow()
    result = nfcore.fit_density(flow, data, steps=300, lr=5e-3, seed=0, patience=None)
    assert isinstance(result, FitResult) and result.flow is flow
    train_idx, _ = split(len(data), 0.1, 0)
    np.testing.assert_allclose(flow.layers[0].loc.numpy(), data[train_idx.numpy()].mean(0),
                               rtol=1e-5)
    held = _data(400, seed=1)
    got = float(flow.log_prob(held).detach().mean())
    want = float(_true_log_prob(held).mean())
    assert abs(got - want) < 0.15, (got, want)  # data units: log det of the scale is included
    s = result.summary
    json.dumps(s, allow_nan=False)
    assert s["objective"] == "density" and s["data_shape"] == [600, 2]
    assert s["validation_rows"] == 60 and s["train_rows"] == 540
    assert s["steps"] == 300 and s["stopped_reason"] == "completed" and s["seed"] == 0
    assert math.isfinite(s["val_loss"]) and math.isfinite(s["loss"]) and s["duration_s"] > 0
    assert result.history[-1]["step"] == 300
    assert result.history[0]["loss"] > result.history[-1]["loss"]


def test_fit_density_sets_spline_knots_from_the_data_unless_told_not_to():
    rng = np.random.default_rng(3)
    data = rng.normal(scale=0.05, size=(600, 2)) + rng.choice([-1.0, 1.0], size=(600, 1))
    moved, first = {}, {}
    for init_knots in (True, False):
        flow = _flow(bins=8)  # with SPEC's 4 bins, too coarse to resolve two modes
        spline = next(m for m in flow.layers if hasattr(m, "initialize_knots"))
        before = spline.net[-1].bias.detach().clone()
        result = nfcore.fit_density(flow, data, steps=1, lr=1e-7, seed=0, init_knots=init_knots)
        moved[init_knots] = float((spline.net[-1].bias - before).abs().max())
        first[init_knots] = result.history[0]["loss"]
    assert moved[True] > 0.1 and moved[False] < 1e-5
    assert first[True] < first[False] - 0.2  # the first step's loss, before any learning


def test_best_weights_are_restored_after_early_stopping():
    data = _data(40)
    flow = _flow(hidden=[64, 64])
    result = nfcore.fit_density(flow, data, steps=3000, lr=1e-2, schedule="constant",
                                validation_fraction=0.25, patience=5, validate_every=5, seed=2)
    s = result.summary
    assert s["stopped_reason"] == "early_stopping" and s["steps"] < 3000
    vals = [h["val_loss"] for h in result.history]
    assert s["val_loss"] == min(vals) and vals[-1] > min(vals)
    _, val_idx = split(len(data), 0.25, 2)
    restored = -float(flow.log_prob(data[val_idx.numpy()]).detach().double().mean())
    assert abs(restored - s["val_loss"]) < 1e-4


def test_same_seed_same_model_and_other_seed_differs():
    data = _data(300)
    a = nfcore.fit_density(_flow(), data, steps=40, seed=7).flow
    b = nfcore.fit_density(_flow(), data, steps=40, seed=7).flow
    c = nfcore.fit_density(_flow(), data, steps=40, seed=8).flow
    assert _max_diff(a, b) == 0.0
    assert _max_diff(a, c) > 1e-4


def test_epochs_budget_and_conditional_flow():
    rng = np.random.default_rng(0)
    ctx = rng.normal(size=(200, 1)).astype(np.float32)
    x = (ctx * [1.0, -1.0] + 0.1 * rng.normal(size=(200, 2))).astype(np.float32)
    flow = _flow(context_dim=1)
    result = nfcore.fit_density(flow, x, context=ctx, epochs=3, batch_size=64, seed=0)
    assert result.summary["total_steps"] == 3 * math.ceil(180 / 64)
    with pytest.raises(ShapeError, match="needs a context"):
        nfcore.fit_density(flow, x, steps=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"data": np.zeros((10, 3))}, ShapeError, r"shape \(N, 2\)"),
        ({"data": np.full((10, 2), np.nan)}, ShapeError, "finite"),
        ({"data": np.zeros((1, 2))}, ShapeError, "at least 2 rows"),
        ({"data": [["a", "b"]]}, ShapeError, "numeric"),
        # one value in a column: no density exists (every preset diverged or reported nonsense)
        ({"data": np.column_stack([np.arange(10.0), np.full(10, 3.0)])}, ShapeError,
         r"data column 1 is constant \(every row is 3\)"),
        ({"data": np.full((10, 2), -2.5)}, ShapeError,
         r"data column 0 is constant \(every row is -2.5\), and so are columns \[1\]"),
        ({"steps": 5, "epochs": 1}, ValueError, "steps or epochs, not both"),
        ({"steps": 0}, ValueError, "steps to be a positive integer"),
        ({"schedule": "warp"}, ValueError, "schedule in"),
        ({"lr": -1.0}, ValueError, "lr to be a positive number"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"validation_fraction": 1.0}, ValueError, "validation_fraction"),
        ({"patience": 0}, ValueError, "patience"),
        ({"max_seconds": 0}, ValueError, "max_seconds"),
        ({"context": np.zeros((10, 1))}, ShapeError, "takes no context"),
    ],
)
def test_fit_density_rejects_bad_arguments(kwargs, error, message):
    kwargs = {"data": _data(10), **kwargs}
    with pytest.raises(error, match=message):
        nfcore.fit_density(_flow(), **kwargs)


# --------------------------------------------------------------------------- reverse KL
def test_fit_target_reduces_kl_and_reports_diagnostics():
    flow = _flow(standardize=False)
    before = nfcore.train.evaluate_target(flow, nfcore.targets.get("banana"), 4000)
    result = nfcore.fit_target(flow, "banana", steps=300, lr=5e-3, ess_samples=4000, seed=0)
    s = result.summary
    json.dumps(s, allow_nan=False)
    assert s["objective"] == "variational" and s["target"] == "banana" and s["steps"] == 300
    assert s["kl"] < 0.5 * before["kl"] and s["kl"] > -0.05
    assert abs(s["kl"] - (s["log_z"] - s["elbo"])) < 1e-12
    assert 0 < s["ess_fraction"] <= 1 and s["ess_samples"] == 4000
    assert s["stopped_reason"] == "completed"


def test_fit_target_with_expression_and_annealing():
    target = nfcore.targets.from_expression(2, "-0.5*sum(((z - m)/s)**2)",
                                            {"m": [1.0, -1.0], "s": [0.5, 1.0]})
    flow = _flow(standardize=False)
    result = nfcore.fit_target(flow, target, steps=200, lr=1e-2, anneal_steps=100,
                               ess_samples=2000)
    assert result.history[0]["beta"] < 0.5 and result.history[-1]["beta"] == 1.0
    assert result.summary["kl"] is None and result.summary["ess_fraction"] > 0.5
    mean = flow.sample(4000, generator=torch.Generator().manual_seed(0)).mean(0)
    torch.testing.assert_close(mean, torch.tensor([1.0, -1.0]), atol=0.15, rtol=0)


def test_path_gradient_vanishes_at_the_optimum_where_the_total_one_does_not():
    from nfcore.train.losses import ReverseKL

    target = nfcore.targets.from_expression(2, "-0.5*sum(z**2)")
    # An LU layer starts as its permutation, so q is exactly N(0, I): the target itself.
    flow = nfcore.build({"dim": 2, "dtype": "float64",
                         "layers": [{"type": "lu_linear", "permutation": "reverse"}]})
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads, losses = {}, {}
    for path in (False, True):
        flow.zero_grad()
        loss, _ = ReverseKL(target, path=path)(flow, noise)
        loss.backward()
        grads[path] = torch.cat([p.grad.flatten() for p in flow.parameters()])
        losses[path] = loss.item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-12)
    assert grads[True].abs().max() < 1e-12
    assert grads[False].abs().max() > 1e-3


def test_fit_target_gradient_option():
    assert nfcore.fit_target(_flow(), "U1", steps=3, ess_samples=100).summary["gradient"] == "path"
    planar = nfcore.build({"preset": "planar", "dim": 2, "transforms": 2})
    assert nfcore.fit_target(planar, "U1", steps=3, ess_samples=100).summary["gradient"] == "total"
    total = nfcore.fit_target(_flow(), "U1", steps=3, ess_samples=100, gradient="total")
    assert total.summary["gradient"] == "total"
    with pytest.raises(ValueError, match="gradient"):
        nfcore.fit_target(_flow(), "U1", steps=3, gradient="score")


def test_fit_target_accepts_the_json_form_and_records_it():
    spec = {"dim": 2, "log_prob": "-0.5*sum((z/s)**2)", "constants": {"s": [1.0, 2.0]}}
    result = nfcore.fit_target(_flow(), spec, steps=3, ess_samples=100)
    assert result.summary["target_spec"] == spec and result.summary["target"] == "expression"
    result = nfcore.fit_target(_flow(), {"builtin": "U3"}, steps=3, ess_samples=100)
    assert result.summary["target_spec"] == {"builtin": "U3"} and result.summary["kl"] is not None


def test_fit_target_checks_target():
    with pytest.raises(TargetError, match="Unknown target"):
        nfcore.fit_target(_flow(), "nope", steps=2)
    with pytest.raises(TargetError, match="has dim 5; the flow has dim 2"):
        nfcore.fit_target(_flow(), nfcore.targets.get("funnel", dim=5), steps=2)
    with pytest.raises(TargetError, match="unconditional"):
        nfcore.fit_target(_flow(context_dim=1), "U1", steps=2)


def test_fit_target_same_seed_same_model():
    a = nfcore.fit_target(_flow(), "U2", steps=30, seed=3, ess_samples=100).flow
    b = nfcore.fit_target(_flow(), "U2", steps=30, seed=3, ess_samples=100).flow
    assert _max_diff(a, b) == 0.0


def test_nan_target_raises_training_diverged():
    target = nfcore.targets.from_expression(2, "log(z[0] - 1000)")
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        nfcore.fit_target(_flow(), target, steps=200)


# --------------------------------------------------------------------------- checkpoints
class _Killed(Exception):
    pass


def _kill_at(step: int):
    def callback(progress: Progress) -> None:
        if progress.step >= step:
            raise _Killed

    return callback


@pytest.mark.parametrize("objective", ["density", "target"])
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, objective):
    data = _data(300)

    def run(flow, **kw):
        if objective == "density":
            return nfcore.fit_density(flow, data, steps=60, batch_size=64, validate_every=10,
                                      seed=1, **kw)
        return nfcore.fit_target(flow, "U1", steps=60, batch_size=64, seed=1, ess_samples=500,
                                 report_every=10, **kw)

    full = run(_flow(0))
    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(_Killed):  # a worker killed at step 35; the last checkpoint is from then
        run(_flow(0), checkpoint_path=str(ckpt), checkpoint_every_s=0.0, callback=_kill_at(35))
    saved = load_checkpoint(ckpt)
    assert 30 <= saved["state"]["step"] < 60
    # A fresh process builds the flow with different initial weights and resumes.
    resumed = run(_flow(123), checkpoint_path=str(ckpt))
    assert resumed.summary["resumed_from_step"] == saved["state"]["step"]
    assert _max_diff(full.flow, resumed.flow) <= RESUME_TOLERANCE
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    key = "val_loss" if objective == "density" else "elbo"
    assert resumed.summary[key] == pytest.approx(full.summary[key], abs=1e-6)


def test_checkpoint_is_plain_safetensors_with_optimizer_state(tmp_path: Path):
    ckpt = tmp_path / "c.safetensors"
    nfcore.fit_target(_flow(), "U1", steps=5, ess_samples=100, checkpoint_path=str(ckpt))
    raw = ckpt.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert "nfcore.checkpoint" in header["__metadata__"]
    with safe_open(str(ckpt), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.") for k in keys)
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg_sq") for k in keys)
    assert not list(tmp_path.glob(".*.tmp"))
    # A finished checkpoint resumes to the same end without training further.
    again = nfcore.fit_target(_flow(9), "U1", steps=5, ess_samples=100, checkpoint_path=str(ckpt))
    assert again.summary["resumed_from_step"] == 5 and again.summary["steps"] == 5


def test_checkpoint_from_a_different_run_is_refused_and_resume_false_ignores_it(tmp_path: Path):
    ckpt = tmp_path / "c.safetensors"
    nfcore.fit_target(_flow(), "U1", steps=5, ess_samples=100, checkpoint_path=str(ckpt))
    with pytest.raises(ValueError, match="different run"):
        nfcore.fit_target(_flow(), "U2", steps=5, ess_samples=100, checkpoint_path=str(ckpt))
    with pytest.raises(ValueError, match="different run"):
        nfcore.fit_target(_flow(), "U1", steps=5, lr=1e-2, checkpoint_path=str(ckpt))
    fresh = nfcore.fit_target(_flow(), "U2", steps=5, ess_samples=100, checkpoint_path=str(ckpt),
                              resume=False)
    assert fresh.summary["resumed_from_step"] is None
    ckpt.write_bytes(b"garbage")
    with pytest.raises(nfcore.ArtifactError, match="Cannot resume"):
        nfcore.fit_target(_flow(), "U2", steps=5, checkpoint_path=str(ckpt))


# --------------------------------------------------------------------------- control
def test_should_stop_cancels_within_one_step_and_writes_nothing(tmp_path: Path):
    calls: list[int] = []
    seen: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    ckpt = tmp_path / "c.safetensors"
    with pytest.raises(TrainingCancelled, match="step 3"):
        nfcore.fit_density(_flow(), _data(100), steps=100, should_stop=should_stop,
                           callback=lambda p: seen.append(p.step), checkpoint_path=str(ckpt),
                           checkpoint_every_s=3600.0)
    assert len(calls) == 4 and max(seen, default=0) <= 3
    assert not ckpt.exists() and not list(tmp_path.iterdir())


def test_progress_reports(tmp_path: Path):
    reports: list[Progress] = []
    nfcore.fit_density(_flow(), _data(200), steps=40, callback=reports.append, validate_every=10)
    assert [r.step for r in reports if r.val_loss is not None] == [10, 20, 30, 40]
    last = reports[-1]
    assert last.step == last.total == 40 and last.elapsed > 0 and last.eta == 0
    assert all(isinstance(r.loss, float) for r in reports)
    steps = [r.step for r in reports]
    assert steps == sorted(steps)


def test_max_seconds_stops_the_run():
    result = nfcore.fit_target(_flow(), "U1", steps=10**6, max_seconds=0.3, ess_samples=100)
    assert result.summary["stopped_reason"] == "max_seconds"
    assert 0 < result.summary["steps"] < 10**6


def test_summary_goes_into_the_artifact(tmp_path: Path):
    result = nfcore.fit_target(_flow(), "U1", steps=5, ess_samples=100)
    path = tmp_path / "m" / "model.safetensors"
    nfcore.save(result.flow, path, metadata={"training": result.summary})
    loaded = nfcore.load(path)
    assert json.loads(loaded.metadata["training"])["target"] == "U1"


# --------------------------------------------------------------------------- budgets
def test_a_time_budget_alone_trains_until_the_time_is_up_and_anneals_over_it():
    for fit in (lambda f: nfcore.fit_density(f, _data(300), max_seconds=2.0, patience=None),
                lambda f: nfcore.fit_target(f, "U1", max_seconds=2.0, ess_samples=500,
                                            start="none")):
        result = fit(_flow())
        s = result.summary
        assert s["stopped_reason"] == "max_seconds" and s["total_steps"] is None
        assert s["max_seconds"] == 2.0 and s["steps"] > 0
        # The whole fit (for a target: training and the closing diagnostics) fills the budget.
        assert s["wall_s"] >= 0.95 * 2.0
        # The cosine followed the clock: by the last record the learning rate has decayed.
        assert result.history[-1]["lr"] < 0.05 * s["lr"]


def test_a_step_budget_alone_trains_exactly_that_many_steps():
    result = nfcore.fit_density(_flow(), _data(300), steps=37, patience=None)
    assert result.summary["steps"] == result.summary["total_steps"] == 37
    assert result.summary["stopped_reason"] == "completed" and result.history[-1]["step"] == 37
    result = nfcore.fit_target(_flow(), "U1", steps=23, ess_samples=200)
    assert result.summary["steps"] == 23 and result.summary["stopped_reason"] == "completed"


def test_both_budgets_stop_at_whichever_comes_first():
    short = nfcore.fit_target(_flow(), "U1", steps=5, max_seconds=3600.0, ess_samples=200)
    assert short.summary["stopped_reason"] == "completed" and short.summary["steps"] == 5
    # A learning rate far from the end of the schedule: the clock, not the steps, ended it.
    quick = nfcore.fit_target(_flow(), "U1", steps=10**7, max_seconds=0.5, ess_samples=200)
    assert quick.summary["stopped_reason"] == "max_seconds" and quick.summary["steps"] < 10**7


def test_neither_budget_gives_the_documented_default():
    assert nfcore.train.DEFAULT_STEPS == {"density": 2000, "variational": 5000}
    flow = nfcore.build({"preset": "maf", "dim": 2, "transforms": 1, "hidden": [4]})
    result = nfcore.fit_density(flow, _data(64), batch_size=8, validation_fraction=0.0)
    assert result.summary["steps"] == result.summary["total_steps"] == 2000
    assert result.summary["max_seconds"] is None

"""A density fit's diagnostics (``nfcore.train.density_diagnostics``) can say "do not trust this":
worse than the data's own Gaussian, overfit, a latent space that is not a standard normal, and
columns of few distinct values; and they say ``ok`` for a flow that is the data's distribution."""

import json
import math

import pytest
import torch

import nfcore
from nfcore.train.density_diagnostics import evaluate_density

pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, -0.3, 0.1]], dtype=torch.float64)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) @ mix.T + 10.0


def _gaussian_flow(x: torch.Tensor) -> nfcore.Flow:
    """A maf whose layers are the identity after its data-side layers: the Gaussian of ``x``."""
    flow = nfcore.build({"preset": "maf", "dim": x.shape[1], "transforms": 2, "hidden": [8],
                         "dtype": "float64"})
    for layer in flow.layers:
        layer.reset_identity()
    return flow.initialize(x)


def test_the_datas_own_gaussian_is_ok_on_gaussian_data():
    x = _gaussian_data(6000)
    d = evaluate_density(_gaussian_flow(x[:5000]), x[:5000], x[5000:])
    assert d["verdict"] == "ok" and d["reasons"] == [], d
    assert d["held_out"] is True and d["rows"] == 1000
    assert abs(d["gain_over_gaussian"]) < 3 * d["gain_se"] + 1e-3, d
    assert d["latent_ks"] < 0.05 and d["discrete_columns"] == []
    assert math.isclose(d["log_lik"] - d["gaussian_log_lik"], d["gain_over_gaussian"],
                        abs_tol=1e-5)


def test_an_untrained_flow_is_unreliable():
    x = _gaussian_data(3000)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "maf", "dim": 3, "transforms": 2, "hidden": [16],
                         "dtype": "float64"})  # random weights, not even standardized
    d = evaluate_density(flow, x[:2500], x[2500:])
    assert d["verdict"] == "unreliable", d
    assert "worse than a Gaussian" in d["reasons"][0]
    assert d["gain_over_gaussian"] < -0.3 * 3


def test_a_gaussian_fit_to_two_clusters_is_flagged_by_its_latent_space():
    """Bimodal data under the flow of their Gaussian: the log-likelihood has nothing better to
    compare with (the baseline is that very Gaussian), but the held-out rows' latent coordinate
    is two humps, not a standard normal."""
    g = torch.Generator().manual_seed(1)
    side = torch.where(torch.rand(4000, generator=g) < 0.5, -3.0, 3.0).double()
    x = torch.stack([side + 0.5 * torch.randn(4000, generator=g, dtype=torch.float64),
                     torch.randn(4000, generator=g, dtype=torch.float64)], 1)
    d = evaluate_density(_gaussian_flow(x[:3000]), x[:3000], x[3000:])
    assert d["verdict"] == "check", d
    assert d["latent_ks"] > 0.1
    assert any("do not map to a standard normal: latent coordinate" in r for r in d["reasons"])


def test_columns_of_few_distinct_values_are_named():
    g = torch.Generator().manual_seed(2)
    counts = torch.poisson(torch.full((3000,), 4.0), generator=g).double()
    x = torch.stack([counts, torch.randn(3000, generator=g, dtype=torch.float64)], 1)
    d = evaluate_density(_gaussian_flow(x[:2500]), x[:2500], x[2500:])
    assert d["discrete_columns"] == [0], d
    assert d["verdict"] in ("check", "unreliable")
    said = [r for r in d["reasons"] if "distinct values" in r]
    assert len(said) == 1 and said[0].startswith("column 0 takes few distinct values (")
    assert "dequantize" in said[0]
    # values on a coarse grid count too (column 0's sd is 2: a grid of half an sd); a grid of a
    # fiftieth of the sd, where most values repeat too, is finer than a flow resolves
    rounded = _gaussian_data(3000)
    coarse = torch.cat([rounded[:, :1].round(), rounded[:, 1:]], 1)
    fine = torch.cat([(rounded[:, :1] * 25).round() / 25, rounded[:, 1:]], 1)
    assert evaluate_density(_gaussian_flow(coarse), coarse, coarse[:0])["discrete_columns"] == [0]
    assert evaluate_density(_gaussian_flow(fine), fine, fine[:0])["discrete_columns"] == []
    assert torch.unique(fine[:, 0]).numel() < 1500  # (most of its values do repeat)


def test_a_flow_that_memorized_its_rows_is_overfit():
    """An nsf trained far past its best on 80 rows: it beats the Gaussian on the rows it saw by
    much more than on the rows it did not."""
    x = _gaussian_data(160, seed=3)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "nsf", "dim": 3, "transforms": 2, "hidden": [32, 32],
                         "dtype": "float64"})
    result = nfcore.fit_density(flow, x, steps=600, batch_size=80, lr=1e-2,
                                validation_fraction=0.5, patience=None, seed=0)
    d = result.summary["diagnostics"]
    assert d["train_gain_over_gaussian"] > 2 * max(d["gain_over_gaussian"], 0.0), d
    assert d["verdict"] in ("check", "unreliable")
    assert any(r.startswith("overfit") or "worse than a Gaussian" in r for r in d["reasons"]), d


def test_too_few_rows_are_never_ok():
    x = _gaussian_data(600)
    d = evaluate_density(_gaussian_flow(x[:550]), x[:550], x[550:])
    assert d["rows"] == 50 and d["verdict"] == "check", d
    assert d["reasons"][0].startswith("only 50 held-out rows to judge the fit by")


def test_fit_density_reports_its_diagnostics_held_out_or_not():
    x = _gaussian_data(1200, seed=4)
    flow = nfcore.build({"preset": "maf", "dim": 3, "transforms": 2, "hidden": [16],
                         "dtype": "float64"})
    held = nfcore.fit_density(flow, x, steps=100, seed=0).summary["diagnostics"]
    assert held["held_out"] is True and held["rows"] == 120
    assert held["verdict"] in ("ok", "check", "unreliable") and "train_gain_over_gaussian" in held
    flow = nfcore.build({"preset": "maf", "dim": 3, "transforms": 2, "hidden": [16],
                         "dtype": "float64"})
    alone = nfcore.fit_density(flow, x, steps=100, validation_fraction=0,
                               seed=0).summary["diagnostics"]
    assert alone["held_out"] is False and alone["rows"] == 1200
    assert "train_gain_over_gaussian" not in alone


def test_a_conditional_density_fit_is_diagnosed_with_its_contexts():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2000, 1, generator=g, dtype=torch.float64)
    x = torch.cat([c + 0.3 * torch.randn(2000, 1, generator=g, dtype=torch.float64),
                   torch.randn(2000, 1, generator=g, dtype=torch.float64)], 1)
    flow = nfcore.build({"preset": "maf", "dim": 2, "context_dim": 1, "transforms": 2,
                         "hidden": [16], "dtype": "float64"})
    d = nfcore.fit_density(flow, x, context=c, steps=300, lr=3e-3, seed=0).summary["diagnostics"]
    # the context explains most of column 0's spread, which no unconditional Gaussian can
    assert d["gain_over_gaussian"] > 0.5, d
    assert d["verdict"] == "ok", d


def test_one_held_out_row_and_a_non_finite_score_stay_json():
    x = _gaussian_data(400)
    d = evaluate_density(_gaussian_flow(x[:399]), x[:399], x[399:])
    assert d["rows"] == 1 and d["gain_se"] is None and d["verdict"] == "check"
    bad = x.clone()
    bad[-1, 0] = 1e300  # float64 overflow in the Gaussian's quadratic form
    d = evaluate_density(_gaussian_flow(x[:399]), x[:399], bad[399:])
    json.dumps(d, allow_nan=False)


def test_the_benchmark_script_runs_and_says_so_where_it_should():
    """``benchmarks/density_diagnostics.py`` on its two cases of known trouble, briefly, in this
    process: both are told, and the table says so."""
    from .benchscripts import load_script

    found = load_script("density_diagnostics").main(
        ["--cases", "counts", "60 rows", "--steps", "20", "--jobs", "1", "--no-write"])
    verdicts = {r["case"]: r for r in found}
    assert verdicts["counts"]["discrete_columns"] == [0, 1]
    assert verdicts["60 rows"]["reasons"][0].startswith("only 6 held-out rows")
    assert all(r["verdict"] != "ok" for r in found)


def test_rows_beyond_where_the_flows_own_samples_go_are_flagged():
    # The flow is the training rows' own Gaussian. Held-out rows from the same Gaussian stay
    # within its reach; Cauchy rows (heavy tails) do not, and the flow scores those far below.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "maf", "dim": 2, "transforms": 1, "hidden": [8],
                         "dtype": "float64"})
    _ = [layer.reset_identity() for layer in flow.layers]
    flow.initialize(x[:2000])
    same = evaluate_density(flow, x[:2000], x[2000:])
    assert same["outlying_rows"] == 0 and same["verdict"] == "ok", same
    cauchy = torch.distributions.Cauchy(0.0, 1.0).sample((1000, 2)).double()
    heavy = evaluate_density(flow, x[:2000], cauchy)
    # A standard Cauchy exceeds 5.8 (the radius) in a coordinate 11 % of the time.
    assert heavy["outlying_rows"] > 100 and heavy["verdict"] == "unreliable", heavy
    assert heavy["outlying_log_lik"] < -20
    assert any("beyond where the flow's own samples go" in r for r in heavy["reasons"])

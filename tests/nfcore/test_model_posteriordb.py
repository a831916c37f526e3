"""The eight posteriordb models of ``benchmarks/posteriors/``, written in the model language, against
a straightforward numpy/scipy transcription of each Stan program, at a few points.

The data are small copies (``tests/nfcore/data/posteriordb/``; row subsets for the larger sets),
so these tests never read the shared benchmark data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from nfcore.targets import ModelTarget

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "benchmarks" / "posteriors"
DATA = Path(__file__).resolve().parent / "data" / "posteriordb"
norm, cauchy = stats.norm, stats.cauchy


def ark(p, d):
    y, K, T = np.array(d["y"]), d["K"], d["T"]
    lp = norm.logpdf(p["alpha"], 0, 10) + norm.logpdf(p["beta"], 0, 10).sum()
    lp += cauchy.logpdf(p["sigma"], 0, 2.5)
    for t in range(K, T):
        mu = p["alpha"]
        for k in range(K):
            mu = mu + p["beta"][k] * y[t - k - 1]
        lp += norm.logpdf(y[t], mu, p["sigma"])
    return lp, {}


def arma(p, d):
    y = np.array(d["y"])
    mu, phi, theta, sigma = p["mu"], p["phi"], p["theta"], p["sigma"]
    lp = (norm.logpdf(mu, 0, 10) + norm.logpdf(phi, 0, 2) + norm.logpdf(theta, 0, 2)
          + cauchy.logpdf(sigma, 0, 2.5))
    err = np.empty(len(y))
    nu = mu + phi * mu
    err[0] = y[0] - nu
    for t in range(1, len(y)):
        nu = mu + phi * y[t - 1] + theta * err[t - 1]
        err[t] = y[t] - nu
    return lp + norm.logpdf(err, 0, sigma).sum(), {}


def gp_pois_regr(p, d):
    x, k, n = np.array(d["x"], dtype=float), np.array(d["k"]), d["N"]
    cov = p["alpha"] ** 2 * np.exp(-0.5 * (x[:, None] - x[None]) ** 2 / p["rho"] ** 2)
    f = np.linalg.cholesky(cov + 1e-10 * np.eye(n)) @ p["f_tilde"]
    lp = (stats.gamma.logpdf(p["rho"], 25, scale=1 / 4) + norm.logpdf(p["alpha"], 0, 2)
          + norm.logpdf(p["f_tilde"], 0, 1).sum() + stats.poisson.logpmf(k, np.exp(f)).sum())
    return lp, {"f": f}


def kidiq(p, d):
    mean = p["beta"][0] + p["beta"][1] * np.array(d["mom_iq"])
    return (cauchy.logpdf(p["sigma"], 0, 2.5)
            + norm.logpdf(np.array(d["kid_score"]), mean, p["sigma"]).sum()), {}


def blr(p, d):
    x, y = np.array(d["X"]), np.array(d["y"])
    return (norm.logpdf(p["beta"], 0, 10).sum() + norm.logpdf(p["sigma"], 0, 10)
            + norm.logpdf(y, x @ p["beta"], p["sigma"]).sum()), {}


def mesquite(p, d):
    v = {k: np.array(d[k], dtype=float) for k in d}
    log_weight = np.log(v["weight"])
    log_canopy_volume = np.log(v["diam1"] * v["diam2"] * v["canopy_height"])
    log_canopy_area = np.log(v["diam1"] * v["diam2"])
    log_canopy_shape = np.log(v["diam1"] / v["diam2"])
    log_total_height = np.log(v["total_height"])
    b = p["beta"]
    mean = (b[0] + b[1] * log_canopy_volume + b[2] * log_canopy_area + b[3] * log_canopy_shape
            + b[4] * log_total_height + b[5] * v["group"])
    return norm.logpdf(log_weight, mean, p["sigma"]).sum(), {}


def nes(p, d):
    v = {k: np.array(d[k], dtype=float) for k in d}
    n = len(v["partyid7"])
    age30_44, age45_64, age65up = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        age30_44[i] = d["age_discrete"][i] == 2
        age45_64[i] = d["age_discrete"][i] == 3
        age65up[i] = d["age_discrete"][i] == 4
    b = p["beta"]
    mean = (b[0] + b[1] * v["real_ideo"] + b[2] * v["race_adj"] + b[3] * age30_44
            + b[4] * age45_64 + b[5] * age65up + b[6] * v["educ1"] + b[7] * v["gender"]
            + b[8] * v["income"])
    return norm.logpdf(v["partyid7"], mean, p["sigma"]).sum(), {}


def diamonds(p, d):
    x, y = np.array(d["X"]), np.array(d["Y"])
    k = x.shape[1]
    means_x = np.empty(k - 1)
    xc = np.empty((x.shape[0], k - 1))
    for i in range(1, k):
        means_x[i - 1] = x[:, i].mean()
        xc[:, i - 1] = x[:, i] - means_x[i - 1]
    lp = norm.logpdf(p["b"], 0, 1).sum() + stats.t.logpdf(p["Intercept"], 3, 8, 10)
    lp += stats.t.logpdf(p["sigma"], 3, 0, 10) - stats.t.logsf(0, 3, 0, 10)
    lp += norm.logpdf(y, p["Intercept"] + xc @ p["b"], p["sigma"]).sum()
    return lp, {"b_Intercept": p["Intercept"] - means_x @ p["b"]}


REFERENCES = {
    "arK-arK": ark, "arma-arma11": arma, "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "kidiq-kidscore_momiq": kidiq, "sblrc-blr": blr, "mesquite-logmesquite_logvash": mesquite,
    "nes1972-nes": nes, "diamonds-diamonds": diamonds,
}


def load(name: str) -> tuple[ModelTarget, dict]:
    entry = json.loads((MODELS / f"{name}.json").read_text())
    data = json.loads((DATA / f"{name}.json").read_text())
    assert sorted(data) == sorted(entry["data"])
    return ModelTarget({**entry["model"], "data": data}), data


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_log_density_matches_a_numpy_transcription_of_the_stan_program(name):
    model, data = load(name)
    z = 0.7 * torch.randn(4, model.dim, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    values, _ = model.constrain(z)
    got = model.target_log_prob(values).numpy()
    derived = model.derived(values).numpy()
    named = model.unpack(values)
    for i in range(4):
        params = {k: v[i].numpy() for k, v in named.items()}
        want, extra = REFERENCES[name](params, data)
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-8)
        start = 0
        for key, shape in model.derived_shapes.items():
            size = int(np.prod(shape))
            np.testing.assert_allclose(derived[i, start:start + size],
                                       np.ravel(extra[key]), rtol=1e-9, atol=1e-9)
            start += size
        assert start == derived.shape[1]


def test_every_shipped_model_has_a_reference_and_data():
    assert sorted(p.stem for p in MODELS.glob("*.json")) == sorted(REFERENCES)
    assert sorted(p.stem for p in DATA.glob("*.json")) == sorted(REFERENCES)
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 200_000

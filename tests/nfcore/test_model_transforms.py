"""The constraint transforms of the model language: inverses, log-Jacobians against autograd in
float64, supports, normalization on a grid, and the constrained-space API of a model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.autograd.functional import jacobian

from nfcore.errors import ShapeError, TargetError
from nfcore.targets import ModelTarget, Target, from_spec
from nfcore.targets.transforms import Param

pytestmark = pytest.mark.usefixtures("one_thread")

DECLARATIONS = {
    "real": {},
    "vector": {"shape": [3]},
    "lower": {"lower": -2.0},
    "upper": {"upper": 1.5, "shape": [2]},
    "interval": {"lower": -1, "upper": 3, "shape": [2, 2]},
    "ordered": {"constraint": "ordered", "shape": [4]},
    "positive_ordered": {"constraint": "ordered", "shape": [3], "lower": 0},
    "simplex2": {"constraint": "simplex", "shape": [2]},
    "simplex5": {"constraint": "simplex", "shape": [5]},
}


@pytest.mark.parametrize("kind", sorted(DECLARATIONS))
def test_constrain_inverts_and_its_log_jacobian_matches_autograd(kind):
    p = Param.from_json("x", DECLARATIONS[kind])
    u = 1.5 * torch.randn(6, p.free, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, ladj = p.constrain(u)
    assert x.shape == (6, *p.shape) and ladj.shape == (6,)
    assert bool(p.in_support(x).all())
    torch.testing.assert_close(p.unconstrain(x), u)
    for i in range(6):
        def head(v):  # the first `free` constrained entries (a simplex's last one is implied)
            return p.constrain(v[None])[0].reshape(-1)[:p.free]

        jac = jacobian(head, u[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize(("decl", "check"), [
    ({"lower": 2.0}, lambda x: (x > 2).all()),
    ({"upper": -1.0}, lambda x: (x < -1).all()),
    ({"lower": 0, "upper": 1}, lambda x: ((x > 0) & (x < 1)).all()),
    ({"constraint": "ordered", "shape": [5]}, lambda x: (x.diff(dim=-1) > 0).all()),
    ({"constraint": "simplex", "shape": [4]},
     lambda x: (x > 0).all() and torch.allclose(x.sum(-1), torch.ones(x.shape[0],
                                                                       dtype=x.dtype))),
])
def test_constrained_values_satisfy_the_constraint(decl, check):
    p = Param.from_json("x", decl)
    x, _ = p.constrain(3 * torch.randn(200, p.free, dtype=torch.float64))
    assert check(x)


def test_simplex_centre_is_zero():
    x, _ = Param.from_json("p", {"constraint": "simplex", "shape": [4]}).constrain(
        torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(x, torch.full((1, 4), 0.25, dtype=torch.float64))


def _grid_mass(model: ModelTarget, lo: float = -12, hi: float = 12, n: int = 801) -> float:
    axes = [torch.linspace(lo, hi, n, dtype=torch.float64)] * model.dim
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, model.dim)
    step = (hi - lo) / (n - 1)
    return float(torch.exp(model.log_prob(grid)).sum() * step**model.dim)


@pytest.mark.parametrize(("params", "log_prob"), [
    ({"x": {"lower": 0, "upper": 1}}, "beta_lpdf(x, 2, 3)"),
    ({"x": {"lower": 1}}, "gamma_lpdf(x - 1, 3, 2)"),
    ({"x": {"upper": 0}}, "exponential_lpdf(-x, 1.5)"),
    ({"p": {"constraint": "simplex", "shape": [3]}}, "log(2) + 0 * sum(p)"),  # Dirichlet(1,1,1)
    # a term is summed over its elements, so the constant goes in a term of its own
    ({"p": {"constraint": "ordered", "shape": [2]}}, ["log(2)", "normal_lpdf(p, 0, 1)"]),
])
def test_densities_with_jacobians_integrate_to_one_over_z(params, log_prob):
    model = ModelTarget({"params": params, "log_prob": log_prob})
    n = 4001 if model.dim == 1 else 601
    assert _grid_mass(model, n=n) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize(("decl", "bad"), [
    ({"lower": 0}, [-1.0]),
    ({"lower": 0}, [0.0]),
    ({"upper": 1, "lower": 0}, [1.0]),
    ({"constraint": "ordered", "shape": [3]}, [0.0, 2.0, 1.0]),
    ({"constraint": "simplex", "shape": [3]}, [0.2, 0.2, 0.2]),
    ({"constraint": "simplex", "shape": [3]}, [-0.1, 0.6, 0.5]),
    ({}, [float("nan")]),
])
def test_unconstrain_rejects_values_outside_the_support(decl, bad):
    p = Param.from_json("w", decl)
    x = torch.tensor([bad], dtype=torch.float64).reshape(1, *p.shape)
    assert not bool(p.in_support(x)[0])
    with pytest.raises(TargetError, match=r"params\.w: row 0 is outside the support"):
        p.unconstrain(x)


@pytest.mark.parametrize(("decl", "message"), [
    ({"constraint": "ordered"}, "constraint 'ordered' needs a vector shape"),
    ({"constraint": "ordered", "shape": [2, 2]}, "needs a vector shape"),
    ({"constraint": "simplex", "shape": [1]}, r"needs a vector shape \[k\] with k >= 2"),
    ({"constraint": "simplex", "shape": [3], "lower": 0}, "takes no lower or upper"),
    ({"constraint": "ordered", "shape": [3], "upper": 0}, "lower bound only"),
    ({"constraint": "sorted", "shape": [3]}, "constraint: expected one of"),
    ({"lower": 1, "upper": 1}, "lower < upper"),
    ({"lower": "0"}, "lower: expected a finite number"),
    ({"lower": True}, "expected a finite number"),
    ({"shape": [2, 2, 2]}, r"shape: expected \[\], \[k\] or \[k, m\]"),
    ({"shape": [0]}, "shape"),
    ({"shape": 3}, "shape"),
    ({"size": 3}, "unknown keys"),
    ([], "expected an object"),
])
def test_bad_declarations_name_the_field(decl, message):
    with pytest.raises(TargetError, match=message) as info:
        from_spec({"params": {"w": decl}, "log_prob": "0"})
    assert "params.w" in str(info.value)


# --------------------------------------------------------------------------- a model's spaces
MODEL = {
    "params": {"mu": {}, "tau": {"lower": 0}, "p": {"constraint": "simplex", "shape": [3]},
               "c": {"constraint": "ordered", "shape": [2]},
               "B": {"shape": [2, 2], "lower": -1, "upper": 1}},
    "data": {"y": [1.0, -0.5, 2.0]},
    "log_prob": ["normal_lpdf(mu, 0, 3)", "gamma_lpdf(tau, 2, 1)", "normal_lpdf(y, mu, tau)",
                 "sum(log(p))", "normal_lpdf(c, 0, 1)", "sum(B)"],
    "derived": {"m": "mu + p[0] * tau", "Bc": "B @ c"},
}


@pytest.mark.parametrize(("params", "log_prob", "z"), [
    ({"p": {"lower": 0, "upper": 1}}, "beta_lpdf(p, 0.5, 0.5)", [-800.0, -746.0, 40.0, 800.0]),
    ({"s": {"lower": 0}}, "gamma_lpdf(s, 0.5, 1)", [-800.0, -746.0]),
    ({"s": {"upper": 2}}, "gamma_lpdf(2 - s, 0.5, 1)", [-800.0]),
])
def test_a_density_unbounded_at_a_bound_stays_finite_and_small_where_z_rounds_onto_it(
        params, log_prob, z):
    """exp(u) underflows below u = -745 and sigmoid(u) rounds to 1 above u = 37 in float64, which
    put the constrained value on the bound, where beta(0.5, 0.5) and gamma(0.5) densities are
    +inf although in z they are tiny: such draws read as infinite importance weights."""
    model = ModelTarget({"params": params, "log_prob": [log_prob]})
    values = model.log_prob(torch.tensor(z, dtype=torch.float64)[:, None])
    assert torch.isfinite(values).all(), values
    typical = float(model.log_prob(torch.zeros(1, 1, dtype=torch.float64))[0])
    assert (values < typical - 15).all(), (values, typical)
    constrained, _ = model.constrain(torch.tensor(z, dtype=torch.float64)[:, None])
    assert model.in_support(constrained).all()


def test_model_columns_layout_and_spec_round_trip():
    model = ModelTarget(MODEL)
    assert model.dim == 1 + 1 + 2 + 2 + 4
    assert model.param_columns == ["mu", "tau", "p[0]", "p[1]", "p[2]", "c[0]", "c[1]",
                                   "B[0,0]", "B[0,1]", "B[1,0]", "B[1,1]"]
    assert model.derived_columns == ["m", "Bc[0]", "Bc[1]"]
    assert model.columns == model.param_columns + model.derived_columns
    assert model.param_shapes == {"mu": (), "tau": (), "p": (3,), "c": (2,), "B": (2, 2)}
    assert model.derived_shapes == {"m": (), "Bc": (2,)}
    import json

    again = from_spec(json.loads(json.dumps(model.spec)))
    assert again.spec == model.spec
    z = torch.randn(7, model.dim, dtype=torch.float64)
    torch.testing.assert_close(again.log_prob(z), model.log_prob(z))


def test_model_log_prob_is_density_plus_jacobian_and_round_trips():
    model = ModelTarget(MODEL)
    z = torch.randn(16, model.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values, ladj = model.constrain(z)
    torch.testing.assert_close(model.log_prob(z), model.target_log_prob(values) + ladj)
    torch.testing.assert_close(model.unconstrain(values), z)
    assert bool(model.in_support(values).all())
    # the whole map's log-Jacobian (simplex: over its free entries) against autograd
    keep = [i for i, c in enumerate(model.param_columns) if c != "p[2]"]
    for i in range(3):
        jac = jacobian(lambda v: model.constrain(v[None])[0][0, keep], z[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1])
    named = model.unpack(values)
    assert named["B"].shape == (16, 2, 2)
    torch.testing.assert_close(model.pack(named), values)
    derived = model.derived(values)
    torch.testing.assert_close(derived[:, 0], named["mu"] + named["p"][:, 0] * named["tau"])
    torch.testing.assert_close(derived[:, 1:], (named["B"] @ named["c"][:, :, None])[..., 0])


def test_target_log_prob_is_minus_infinity_outside_the_support():
    model = ModelTarget(MODEL)
    values, _ = model.constrain(torch.zeros(2, model.dim, dtype=torch.float64))
    values[1, 1] = -1.0  # tau < 0
    out = model.target_log_prob(values)
    assert math.isfinite(float(out[0])) and float(out[1]) == float("-inf")
    assert model.in_support(values).tolist() == [True, False]
    with pytest.raises(TargetError, match="params.tau: row 1"):
        model.unconstrain(values)


def test_draws_give_log_q_in_the_constrained_space_and_importance_weights():
    """q = N(0, 1) over z and tau = exp(z): the constrained log q is the log-normal density."""
    model = ModelTarget({"params": {"tau": {"lower": 0}}, "log_prob": "gamma_lpdf(tau, 2, 3)",
                         "derived": {"tau2": "square(tau)"}})
    z = torch.randn(50, 1, dtype=torch.float64)
    log_q = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 0]).double()
    draws = model.draws(z, log_q)
    tau = torch.exp(z[:, 0])
    assert draws.columns == ["tau", "tau2"]
    torch.testing.assert_close(draws.samples, torch.stack([tau, tau * tau], -1))
    np.testing.assert_allclose(draws.log_prob.numpy(), stats.lognorm.logpdf(tau.numpy(), 1.0),
                               rtol=1e-10)
    np.testing.assert_allclose(draws.target_log_prob.numpy(),
                               stats.gamma.logpdf(tau.numpy(), 2, scale=1 / 3), rtol=1e-10)
    torch.testing.assert_close(draws.log_weights, draws.target_log_prob - draws.log_prob)


def test_float32_in_float32_out_with_gradients():
    model = ModelTarget(MODEL)
    z = torch.randn(5, model.dim, requires_grad=True)
    out = model.log_prob(z)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    values, ladj = model.constrain(z.detach())
    assert values.dtype == ladj.dtype == torch.float32


def test_plain_targets_report_z_as_their_constrained_space():
    t = from_spec({"builtin": "banana"})
    assert t.columns == ["z[0]", "z[1]"] and t.param_shapes == {"z": (2,)}
    z = torch.randn(4, 2, dtype=torch.float64)
    draws = t.draws(z, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(draws.samples, z)
    torch.testing.assert_close(draws.target_log_prob, t.log_prob(z))
    torch.testing.assert_close(t.unconstrain(z), z)
    assert isinstance(t, Target) and t.derived(z).shape == (4, 0)


@pytest.mark.parametrize(("named", "message"), [
    ({"mu": [0.0]}, "missing"),
    ({"mu": [0.0], "tau": [1.0], "p": [[0.2, 0.3, 0.5]], "c": [[0, 1]],
      "B": [[[0, 0], [0, 0]]], "extra": [1]}, "unknown"),
    ({"mu": [0.0], "tau": [1.0], "p": [[0.2, 0.8]], "c": [[0, 1]], "B": [[[0, 0], [0, 0]]]},
     r"p: expected shape \(N, 3\)"),
    ({"mu": [0.0, 1.0], "tau": [1.0], "p": [[0.2, 0.3, 0.5]], "c": [[0, 1]],
      "B": [[[0, 0], [0, 0]]]}, "rows"),
    ({"mu": ["a"], "tau": [1.0], "p": [[0.2, 0.3, 0.5]], "c": [[0, 1]], "B": [[[0, 0], [0, 0]]]},
     "expected numbers"),
    ([1, 2], "Expected an object"),
])
def test_pack_names_the_problem(named, message):
    with pytest.raises(ShapeError, match=message):
        ModelTarget(MODEL).pack(named)

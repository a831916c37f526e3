"""Every function and log density of the model language against scipy, numpy or torch, on random
inputs, both per sample (arguments that depend on the parameters) and folded at compile time
(arguments that are data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special, stats

from nfcore.targets import ModelTarget
from nfcore.targets.functions import FUNCTIONS

pytestmark = pytest.mark.usefixtures("one_thread")

N = 5  # samples


def evaluate(expr: str, params: dict[str, np.ndarray], data: dict | None = None) -> np.ndarray:
    """``expr`` per sample, as a derived quantity of a model whose parameters take the given
    values (each ``(N, *shape)``); returns ``(N, *shape of expr)``."""
    first = next(iter(params))
    spec = {"params": {k: {"shape": list(v.shape[1:])} for k, v in params.items()},
            "data": data or {}, "log_prob": f"0 * sum({first})", "derived": {"out": expr}}
    model = ModelTarget(spec)
    values = model.pack({k: torch.as_tensor(v) for k, v in params.items()})
    return model.derived(values).numpy().reshape(N, *model.derived_shapes["out"])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- element-wise
UNARY = {
    "exp": np.exp, "log": np.log, "log1p": np.log1p, "expm1": np.expm1, "sqrt": np.sqrt,
    "square": np.square, "abs": np.abs, "sin": np.sin, "cos": np.cos, "tanh": np.tanh,
    "sigmoid": special.expit, "inv_logit": special.expit, "logit": special.logit,
    "softplus": lambda x: np.logaddexp(0, x), "log1p_exp": lambda x: np.logaddexp(0, x),
    "lgamma": special.gammaln,
}
POSITIVE = {"log", "log1p", "sqrt", "lgamma"}
UNIT = {"logit"}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_functions_match_numpy(name):
    r = rng(hash(name) % 1000)
    x = r.normal(size=(N, 3)) * 3
    if name in POSITIVE:
        x = np.abs(x) + 0.1
    if name in UNIT:
        x = r.uniform(0.01, 0.99, size=(N, 3))
    close(evaluate(f"{name}(x)", {"x": x}), UNARY[name](x))
    data = x[0].tolist()
    close(evaluate(f"{name}(d) + 0 * x", {"x": x}, {"d": data}), UNARY[name](x[0]))


def test_binary_and_where_match_numpy():
    r = rng(1)
    a, b = r.normal(size=(N, 4)), r.normal(size=(N, 1))
    close(evaluate("minimum(a, b)", {"a": a, "b": b}), np.minimum(a, b))
    close(evaluate("maximum(a, b)", {"a": a, "b": b}), np.maximum(a, b))
    close(evaluate("where(a > b, a, 2 * b)", {"a": a, "b": b}), np.where(a > b, a, 2 * b))
    close(evaluate("where(a <= 0, 1, 0)", {"a": a}), np.where(a <= 0, 1.0, 0.0))
    close(evaluate("a ** 2 / b - a * b + 1", {"a": a, "b": b}), a**2 / b - a * b + 1)
    theta = r.uniform(0.05, 0.95, size=(N, 4))
    lp1, lp2 = r.normal(size=(N, 4)), r.normal(size=(N, 4))
    close(evaluate("log_mix(theta, lp1, lp2)", {"theta": theta, "lp1": lp1, "lp2": lp2}),
          np.logaddexp(np.log(theta) + lp1, np.log1p(-theta) + lp2))


def test_integer_data_arithmetic_and_comparisons_fold():
    x = rng(2).normal(size=(N, 1))
    g = [3, 1, 4, 1, 5]
    close(evaluate("where(g == 1, 10, g * 2 - 1) + 0 * x", {"x": x}, {"g": g}),
          np.where(np.array(g) == 1, 10, np.array(g) * 2 - 1).astype(float))
    close(evaluate("g / 2 + x", {"x": x}, {"g": g}), np.array(g) / 2 + x)


# --------------------------------------------------------------------------- reductions, scans
@pytest.mark.parametrize(("name", "ref"), [
    ("sum", np.sum), ("mean", np.mean), ("logsumexp", special.logsumexp),
    ("log_sum_exp", special.logsumexp), ("norm", lambda x, axis=None: np.sqrt(
        np.sum(x * x, axis=axis))),
])
def test_reductions_over_all_axes_and_one_axis(name, ref):
    x = rng(3).normal(size=(N, 3, 4))
    close(evaluate(f"{name}(x)", {"x": x}), ref(x, axis=(1, 2)))
    for axis in (0, 1, -1):
        close(evaluate(f"{name}(x, {axis})", {"x": x}), ref(x, axis=1 + axis % 2))
    s = rng(4).normal(size=(N,))
    scalar = {"norm": np.abs}.get(name, lambda v: v)
    close(evaluate(f"{name}(s)", {"s": s}), scalar(s))


def test_cumsum_along_each_axis():
    x = rng(5).normal(size=(N, 3, 4))
    close(evaluate("cumsum(x)", {"x": x}), np.cumsum(x, axis=1))
    close(evaluate("cumsum(x, 1)", {"x": x}), np.cumsum(x, axis=2))


def _recurrence(init, coef, inp):
    out = np.empty_like(inp)
    out[0] = init
    for t in range(1, len(inp)):
        out[t] = coef[t] * out[t - 1] + inp[t]
    return out


@pytest.mark.parametrize("steps", [1, 2, 7, 64, 200])
def test_linear_recurrence_matches_a_loop(steps):
    r = rng(steps)
    init, coef = r.normal(size=(N,)), r.uniform(-0.99, 0.99, size=(N,))
    inp = r.normal(size=(N, steps))
    got = evaluate("linear_recurrence(init, coef, u)", {"init": init, "coef": coef, "u": inp})
    want = np.stack([_recurrence(init[i], np.full(steps, coef[i]), inp[i]) for i in range(N)])
    close(got.reshape(N, steps), want)
    # a coefficient per step, from the data, and an input of two series with one init each
    per_step = r.uniform(-1, 1, size=steps).tolist()
    two = r.normal(size=(N, steps, 2))
    got = evaluate("linear_recurrence(init, c, u)", {"init": r.normal(size=(N, 2)), "u": two},
                   {"c": [[v] for v in per_step]}) if steps > 1 else None
    if got is not None:
        assert got.shape == (N, steps, 2)


def test_linear_recurrence_garch_variance():
    """GARCH(1,1): sigma2[t] = omega + alpha r[t-1]^2 + beta sigma2[t-1]."""
    r = rng(6)
    ret = r.normal(size=12)
    omega, alpha, beta = (r.uniform(0.1, 0.5, size=N) for _ in range(3))
    got = evaluate("linear_recurrence(1.0, beta, omega + alpha * square(concat(0, r[:-1])))",
                   {"omega": omega, "alpha": alpha, "beta": beta}, {"r": ret.tolist()})
    for i in range(N):
        s2 = [1.0]
        for t in range(1, 12):
            s2.append(omega[i] + alpha[i] * ret[t - 1] ** 2 + beta[i] * s2[-1])
        close(got[i].reshape(12), np.array(s2))


# --------------------------------------------------------------------------- structured
@pytest.mark.parametrize(("sa", "sb"), [((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 2)),
                                        ((2, 3), (3, 4))])
def test_matmul_for_every_pairing_of_sample_and_data_operands(sa, sb):
    r = rng(7)
    a, b = r.normal(size=(N, *sa)), r.normal(size=(N, *sb))
    want = np.stack([a[i] @ b[i] for i in range(N)])
    close(evaluate("a @ b", {"a": a, "b": b}).reshape(want.shape), want)
    close(evaluate("A @ b", {"b": b}, {"A": a[0].tolist()}).reshape(want.shape),
          np.stack([a[0] @ b[i] for i in range(N)]))
    close(evaluate("a @ B", {"a": a}, {"B": b[0].tolist()}).reshape(want.shape),
          np.stack([a[i] @ b[0] for i in range(N)]))


def test_cholesky_gp_cov_diag_rep_concat():
    r = rng(8)
    x = r.normal(size=6)
    alpha, rho = r.uniform(0.5, 2, size=N), r.uniform(0.5, 2, size=N)
    want_k = np.stack([alpha[i] ** 2 * np.exp(-0.5 * (x[:, None] - x[None]) ** 2 / rho[i] ** 2)
                       for i in range(N)])
    got_k = evaluate("gp_exp_quad_cov(x, alpha, rho)", {"alpha": alpha, "rho": rho},
                     {"x": x.tolist()})
    close(got_k.reshape(want_k.shape), want_k)
    pts = r.normal(size=(6, 2))
    want_2d = np.stack([alpha[i] ** 2 * np.exp(-0.5 * ((pts[:, None] - pts[None]) ** 2).sum(-1)
                                                / rho[i] ** 2) for i in range(N)])
    close(evaluate("gp_exp_quad_cov(x, alpha, rho)", {"alpha": alpha, "rho": rho},
                   {"x": pts.tolist()}).reshape(want_2d.shape), want_2d)
    got_l = evaluate("cholesky(gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep(0.1, 6)))",
                     {"alpha": alpha, "rho": rho}, {"x": x.tolist()})
    close(got_l.reshape(N, 6, 6), np.linalg.cholesky(want_k + 0.1 * np.eye(6)))
    v = r.normal(size=(N, 3))
    close(evaluate("diag_matrix(v)", {"v": v}).reshape(N, 3, 3),
          np.stack([np.diag(v[i]) for i in range(N)]))
    close(evaluate("rep(v, 2)", {"v": v}).reshape(N, 2, 3), np.stack([v, v], 1))
    s = r.normal(size=N)
    close(evaluate("concat(s, v, w, 7)", {"s": s, "v": v}, {"w": [1.0, 2.0]}).reshape(N, 7),
          np.concatenate([s[:, None], v, np.tile([1.0, 2.0, 7.0], (N, 1))], 1))
    m = r.normal(size=(N, 2, 3))
    close(evaluate("concat(m, v)", {"m": m, "v": v}).reshape(N, 3, 3),
          np.concatenate([m, v[:, None]], 1))


def test_cholesky_of_a_matrix_that_is_not_positive_definite_is_nan():
    m = np.tile(np.array([[1.0, 2.0], [2.0, 1.0]]), (N, 1, 1))
    m[0] = np.eye(2)
    out = evaluate("cholesky(m)", {"m": m}).reshape(N, 2, 2)
    np.testing.assert_allclose(out[0], np.eye(2))
    assert np.isnan(out[1:]).all()


# --------------------------------------------------------------------------- log densities
def _positive(r, shape):
    return r.uniform(0.3, 3.0, size=shape)


CONTINUOUS = {
    # name: (arity, sampler of the arguments, scipy reference)
    "normal_lpdf": (lambda r: (r.normal(size=(N, 4)) * 3, r.normal(size=(N, 4)),
                               _positive(r, (N, 1))),
                    lambda y, m, s: stats.norm.logpdf(y, m, s)),
    "student_t_lpdf": (lambda r: (r.normal(size=(N, 4)) * 3, _positive(r, (N, 4)) * 3,
                                  r.normal(size=(N, 4)), _positive(r, (N, 4))),
                       lambda y, nu, m, s: stats.t.logpdf(y, nu, m, s)),
    "cauchy_lpdf": (lambda r: (r.normal(size=(N, 4)) * 3, r.normal(size=(N, 4)),
                               _positive(r, (N, 4))),
                    lambda y, m, s: stats.cauchy.logpdf(y, m, s)),
    "lognormal_lpdf": (lambda r: (r.normal(size=(N, 4)) * 2, r.normal(size=(N, 4)),
                                  _positive(r, (N, 4))),
                       lambda y, m, s: stats.lognorm.logpdf(y, s, scale=np.exp(m))),
    "exponential_lpdf": (lambda r: (r.normal(size=(N, 4)) * 2, _positive(r, (N, 4))),
                         lambda y, rate: stats.expon.logpdf(y, scale=1 / rate)),
    "gamma_lpdf": (lambda r: (r.normal(size=(N, 4)) * 2, _positive(r, (N, 4)),
                              _positive(r, (N, 4))),
                   lambda y, a, b: stats.gamma.logpdf(y, a, scale=1 / b)),
    "inv_gamma_lpdf": (lambda r: (r.normal(size=(N, 4)) * 2, _positive(r, (N, 4)),
                                  _positive(r, (N, 4))),
                       lambda y, a, b: stats.invgamma.logpdf(y, a, scale=b)),
    "beta_lpdf": (lambda r: (r.uniform(-0.2, 1.2, size=(N, 4)), _positive(r, (N, 4)),
                             _positive(r, (N, 4))),
                  lambda y, a, b: stats.beta.logpdf(y, a, b)),
    "uniform_lpdf": (lambda r: (r.normal(size=(N, 4)), -_positive(r, (N, 4)),
                                _positive(r, (N, 4))),
                     lambda y, lo, hi: stats.uniform.logpdf(y, lo, hi - lo)),
}


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_continuous_densities_match_scipy(name):
    sample, reference = CONTINUOUS[name]
    args = sample(rng(hash(name) % 1000))
    names = [f"a{i}" for i in range(len(args))]
    call = f"{name}({', '.join(names)})"
    want = reference(*args)
    close(evaluate(call, dict(zip(names, args, strict=True))), want)
    # the outcome as data (one row of it), the parameters per sample
    data = {"y": args[0][0].tolist()}
    got = evaluate(f"{name}(y, {', '.join(names[1:])})", dict(zip(names[1:], args[1:],
                                                                  strict=True)), data)
    close(got, reference(args[0][0], *args[1:]))
    if name not in ("normal_lpdf", "student_t_lpdf", "cauchy_lpdf"):
        assert np.isneginf(want).any(), "the inputs should reach outside the support"


DISCRETE = {
    "bernoulli_logit_lpmf": (lambda r: (r.integers(0, 2, size=4), r.normal(size=(N, 4)) * 2),
                             lambda y, a: stats.bernoulli.logpmf(y, special.expit(a))),
    "binomial_logit_lpmf": (lambda r: (r.integers(0, 6, size=4), r.integers(6, 12, size=4),
                                       r.normal(size=(N, 4))),
                            lambda y, n, a: stats.binom.logpmf(y, n, special.expit(a))),
    "poisson_log_lpmf": (lambda r: (r.integers(0, 30, size=4), r.normal(size=(N, 4)) * 2),
                         lambda y, eta: stats.poisson.logpmf(y, np.exp(eta))),
    "neg_binomial_2_log_lpmf": (lambda r: (r.integers(0, 30, size=4), r.normal(size=(N, 4)) * 2,
                                           _positive(r, (N, 4)) * 3),
                                lambda y, eta, phi: stats.nbinom.logpmf(
                                    y, phi, phi / (np.exp(eta) + phi))),
}


@pytest.mark.parametrize("name", sorted(DISCRETE))
def test_discrete_densities_match_scipy(name):
    sample, reference = DISCRETE[name]
    args = sample(rng(hash(name) % 1000))
    data = {"y": args[0].tolist()}
    params = {}
    names = ["y"]
    for i, a in enumerate(args[1:]):
        if a.ndim == 1:  # integer data (binomial trials)
            data[f"d{i}"] = a.tolist()
            names.append(f"d{i}")
        else:
            params[f"p{i}"] = a
            names.append(f"p{i}")
    close(evaluate(f"{name}({', '.join(names)})", params, data), reference(*args))


def test_multi_normal_cholesky_matches_scipy_for_one_vector_and_an_array_of_them():
    r = rng(9)
    k = 3
    a = r.normal(size=(N, k, k))
    chol = np.linalg.cholesky(a @ a.transpose(0, 2, 1) + np.eye(k))
    mu = r.normal(size=(N, k))
    y = r.normal(size=(6, k))
    got = evaluate("multi_normal_cholesky_lpdf(y, mu, L)", {"mu": mu, "L": chol},
                   {"y": y.tolist()})
    want = np.stack([stats.multivariate_normal.logpdf(y, mu[i], chol[i] @ chol[i].T)
                     for i in range(N)])
    close(got.reshape(N, 6), want)
    got = evaluate("multi_normal_cholesky_lpdf(v, mu, L)", {"v": y[:1].repeat(N, 0), "mu": mu},
                   {"L": chol[0].tolist()})
    close(got.reshape(N), [stats.multivariate_normal.logpdf(y[0], mu[i], chol[0] @ chol[0].T)
                           for i in range(N)])


def test_every_library_function_is_tested_here():
    tested = (set(UNARY) | set(CONTINUOUS) | set(DISCRETE)
              | {"minimum", "maximum", "where", "log_mix", "sum", "mean", "logsumexp",
                 "log_sum_exp", "norm", "cumsum", "linear_recurrence", "cholesky",
                 "gp_exp_quad_cov", "rep", "concat", "diag_matrix", "multi_normal_cholesky_lpdf"})
    assert set(FUNCTIONS) == tested


def test_gradients_reach_every_parameter_through_the_densities():
    model = ModelTarget({
        "params": {"mu": {}, "s": {"lower": 0}, "nu": {"lower": 1}, "e": {"shape": [3]}},
        "data": {"y": [0.5, -1.0, 2.0], "k": [1, 0, 3]},
        "log_prob": ["student_t_lpdf(y, nu, mu, s)", "poisson_log_lpmf(k, e)",
                     "neg_binomial_2_log_lpmf(k, e, s)", "gamma_lpdf(s, 2, 2)"]})
    z = torch.randn(4, model.dim, dtype=torch.float64, requires_grad=True)
    model.log_prob(z).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs() > 0).all()


def test_an_exploding_recurrence_saturates_instead_of_giving_nan():
    coef = np.array([300.0, -1.5, 0.5, 1e10, 0.0])
    got = evaluate("linear_recurrence(1, coef, rep(1.0, 200))", {"coef": coef})
    assert not np.isnan(got).any()
    close(got[2], _recurrence(1.0, np.full(200, 0.5), np.ones(200)))
    close(got[4], np.ones(200))
    assert np.abs(got[0, -1]) == np.finfo(np.float64).max


def test_a_density_below_float32_range_saturates_in_float32():
    model = ModelTarget({"params": {"theta": {}},
                         "data": {"y": np.random.default_rng(0).normal(size=200).tolist()},
                         "log_prob": "normal_lpdf(linear_recurrence(y[0], -theta, y), 0, 1)"})
    z = torch.tensor([[0.5], [1.5], [6.0]], requires_grad=True)
    out = model.log_prob(z)
    assert torch.isfinite(out).all() and float(out[1].detach()) < -1e30
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert float(model.log_prob(z.detach().double())[1]) < -1e60  # float64 keeps the value

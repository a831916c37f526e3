"""Residual layers: the Lipschitz bound, a deterministic spectral norm, the fixed-point inverse
and its gradient, and the labelled estimate of log|det| above ``exact_dim``."""

import pytest
import torch

import nfcore
from nfcore.layers import RESIDUAL_TOLERANCE, Residual
from nfcore.layers.residual import LipschitzMLP


def _layer(dim: int = 3, exact_dim: int = 16, lipschitz: float = 0.97, seed: int = 0) -> Residual:
    torch.manual_seed(seed)
    layer = Residual(dim, hidden=[16, 16], lipschitz=lipschitz, exact_dim=exact_dim).double()
    with torch.no_grad():
        for p in layer.parameters():  # far from the initial weights: the bound must bind
            p.add_(torch.randn_like(p))
    return layer.train(False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)


def test_g_is_contractive_with_the_stated_bound():
    layer = _layer(lipschitz=0.9)
    weights = layer.g.weights()
    _, derivatives = layer.g.evaluate(_x(256, 3), None, weights)
    jac = LipschitzMLP.jacobian(weights, derivatives).mT
    x = _x(4, 3)
    for point, j in zip(x, LipschitzMLP.jacobian(weights, layer.g.evaluate(x, None, weights)[1]),
                        strict=True):
        expected = torch.autograd.functional.jacobian(
            lambda v: layer.g.evaluate(v[None], None, weights)[0][0], point)
        assert torch.allclose(j.T, expected, atol=1e-12)
    norms = torch.linalg.matrix_norm(jac, ord=2)
    assert norms.max() <= 0.9 + 1e-12
    for lin, (w, _) in zip(layer.g.linears, weights, strict=True):  # the bound binds each map
        assert torch.isclose(torch.linalg.matrix_norm(w, ord=2), torch.tensor(lin.bound,
                                                                              dtype=w.dtype))


def test_inference_spectral_norm_is_exact_and_leaves_the_state_alone():
    layer = _layer()
    u, v = layer.g.linears[0].u.clone(), layer.g.linears[0].v.clone()
    x = _x(8, 3)
    a = layer(x)[0]
    layer.train(False)
    b = layer(x)[0]
    assert torch.equal(a, b)
    assert torch.equal(layer.g.linears[0].u, u) and torch.equal(layer.g.linears[0].v, v)
    for lin in layer.g.linears:
        w = lin.normalized_weight()
        assert torch.linalg.matrix_norm(w, ord=2) <= lin.bound * (1 + 1e-12)
    # Training runs one power iteration per pass and keeps it in the state dict.
    layer.train()
    layer(x)
    assert not torch.equal(layer.g.linears[0].u, u)
    assert "g.linears.0.u" in layer.state_dict()


def test_fixed_point_inverse_meets_its_tolerance():
    layer = _layer(lipschitz=0.97)
    z = _x(64, 3)
    with torch.no_grad():
        x, _ = layer.inverse(z)
        residual = (layer(x)[0] - z).abs().amax(-1)
    tol = RESIDUAL_TOLERANCE[torch.float64]
    # One more iteration than the stopping rule needed: within tol, a fortiori.
    assert (residual <= tol * (1 + z.abs().amax(-1))).all()


def test_non_converging_or_non_finite_inverse_raises(monkeypatch):
    layer = _layer()
    z = _x(4, 3)
    with pytest.raises(nfcore.ConvergenceError, match="non-finite"):
        layer.inverse(torch.full((2, 3), float("nan"), dtype=torch.float64))
    monkeypatch.setattr("nfcore.layers.residual._MAX_ITERATIONS", 2)
    with pytest.raises(nfcore.ConvergenceError, match="did not converge in 2 iterations"):
        layer.inverse(z)


def test_time_limit_stops_the_fixed_point_iteration():
    layer = _layer()
    with nfcore.time_limit(1e-9), pytest.raises(nfcore.SolverTimeout, match="residual"):
        layer.inverse(_x(4, 3))


def test_implicit_gradient_of_the_inverse_matches_unrolled_iterations():
    layer = _layer(lipschitz=0.8).train(False)
    z = _x(5, 3).requires_grad_()
    x, ladj = layer.inverse(z)
    loss = (x**2).sum() + ladj.sum()
    grads = torch.autograd.grad(loss, [z, *layer.parameters()], allow_unused=True)

    # Reference: plain autograd through 300 fixed-point iterations.
    weights = layer.g.weights()
    xr = z
    for _ in range(300):
        xr = z - layer.g.evaluate(xr, None, weights)[0]
    _, derivatives = layer.g.evaluate(xr, None, weights)
    jac = LipschitzMLP.jacobian(weights, derivatives)
    eye = torch.eye(3, dtype=torch.float64)
    ref_loss = (xr**2).sum() - torch.linalg.slogdet(eye + jac)[1].sum()
    ref = torch.autograd.grad(ref_loss, [z, *layer.parameters()], allow_unused=True)
    for g, r in zip(grads, ref, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r, atol=1e-7, rtol=1e-6)


def test_log_det_above_exact_dim_is_an_unbiased_labelled_estimate():
    exact, estimated = _layer(dim=4, exact_dim=16), _layer(dim=4, exact_dim=2)
    estimated.load_state_dict(exact.state_dict())
    flow = nfcore.build({"dim": 4, "dtype": "float64",
                         "layers": [{"type": "residual", "exact_dim": 2, "hidden": [8]}]})
    assert not flow.exact_log_prob and flow.cost["log_prob"] == "one pass"
    x = _x(3, 4)
    truth = exact(x)[1]
    # Scoring: a fixed estimate, the same for a row whatever rows come with it.
    scored = estimated(x)[1]
    assert torch.equal(scored, estimated(x)[1])
    assert torch.allclose(estimated(x[:1])[1], scored[:1], atol=1e-12)
    # Training: fresh randomness each pass, unbiased on average.
    estimated.train()
    draws = torch.stack([estimated(x)[1].detach() for _ in range(400)])
    assert int(estimated.draws) == 400
    mean, se = draws.mean(0), draws.std(0) / 20
    assert ((mean - truth).abs() <= 4 * se + 1e-3).all(), (mean, truth, se)
    assert (draws.std(0) > 0).all()


def test_training_estimates_repeat_from_the_same_state():
    a, b = _layer(dim=4, exact_dim=2), _layer(dim=4, exact_dim=2)
    a.train(), b.train()
    x = _x(3, 4)
    assert torch.equal(a(x)[1], b(x)[1])
    assert not torch.equal(a(x)[1], a(x)[1])


def test_resflow_preset_puts_actnorm_before_each_block_and_fits_data():
    spec = {"preset": "resflow", "dim": 2, "transforms": 3, "hidden": [16], "lipschitz": 0.9}
    kinds = [layer["type"] for layer in nfcore.normalize_spec(spec)["layers"]]
    assert kinds == ["standardize", "loc_scale"] + ["actnorm", "residual"] * 3
    torch.manual_seed(0)
    flow = nfcore.build(spec)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1000, 2, generator=g)
    data[:, 1] = data[:, 1] * 0.3 + 0.5 * data[:, 0] ** 2  # a banana
    with torch.no_grad():
        before = float(flow.log_prob(data).mean())
    result = nfcore.fit_density(flow, data, steps=60, batch_size=128, lr=5e-3)
    assert result.summary["loss_function"] == "likelihood"
    with torch.no_grad():
        assert float(flow.log_prob(data).mean()) > before + 0.2
    # Sampling inverts every block after training too.
    x, log_q = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(flow.log_prob(x), log_q, atol=1e-3)


def test_initialize_puts_the_activations_bends_where_the_data_are():
    torch.manual_seed(0)
    spec = {"preset": "resflow", "dim": 3, "transforms": 2, "hidden": [32, 32], "lipschitz": 0.9}
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3000, 3, generator=g) * torch.tensor([5.0, 0.2, 1.0]) + 3.0
    untouched = nfcore.build(spec)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    untouched.initialize(data, knots=False)  # knots=False keeps the activations as they were
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items()
               if ".g." in k)
    flow = nfcore.build(spec).initialize(data)
    h, checked = data, 0
    for layer in flow.layers:
        if isinstance(layer, Residual):
            a = h
            for act, (w, b) in zip(layer.g.activations, layer.g.weights(), strict=False):
                pre = a @ w.T  # the pre-activations without the bias
                beta = torch.nn.functional.softplus(act.beta)
                assert torch.isclose(beta * pre.std(0).mean(), torch.tensor(1.0), rtol=1e-3)
                lo, hi = torch.quantile(pre, torch.tensor([0.05, 0.95]), dim=0)
                assert ((-b >= lo) & (-b <= hi)).all()  # every bend inside the data
                a = act.value_and_derivative(pre + b)[0]
                checked += 1
        h = layer(h)[0]
    assert checked == 4
    # The bound is untouched, and the flow still inverts.
    z = flow.transform(data[:64])[0]
    assert torch.allclose(flow.layers[-1].inverse(flow.layers[-1](z)[0])[0], z, atol=1e-4)

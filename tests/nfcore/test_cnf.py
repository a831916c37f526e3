"""Continuous normalizing flows: the exact divergence, the solver's tolerance and limits, and
training by flow matching, by maximum likelihood and by reverse KL."""

import pytest
import torch
from torch.autograd.functional import jacobian

import nfcore
from nfcore.layers import CNF
from nfcore.train import FlowMatching

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("hidden", [[12], [12, 10], [12, 10, 8]])
@pytest.mark.parametrize("activation", ["silu", "tanh", "elu", "gelu"])
def test_divergence_is_the_trace_of_the_jacobian(hidden, activation):
    torch.manual_seed(0)
    layer = CNF(3, hidden=hidden, activation=activation, context_dim=2).double()
    ctx = _x(4, 2, seed=3)
    f = layer.field.dynamics(ctx, None)
    t = torch.tensor(0.3, dtype=torch.float64)
    x = _x(4, 3)
    v, div = f(t, x)
    for i in range(4):
        jac = jacobian(lambda p, i=i: layer.field.dynamics(ctx[i : i + 1], None)(t, p[None])[0][0],
                       x[i])
        assert torch.allclose(div[i], torch.trace(jac), atol=1e-12)
    assert torch.allclose(v, layer.field.velocity(t.expand(4), x, ctx), atol=1e-12)
    # The solver's right-hand side over the flat state [x, l], forward and backward in time:
    # without autograd it is the lean path (buffers reused across evaluations).
    y = torch.cat([x, _x(4, 1, seed=5)], dim=1)
    for sign in (1.0, -1.0):
        with torch.no_grad():
            g = layer.field.ode(ctx, None, sign)
            first, again = g(sign * t, y), g(sign * t, y)
        assert torch.equal(first, again)
        assert torch.allclose(first, sign * torch.cat([v, div[:, None]], 1), atol=1e-12)


def test_hutchinson_estimate_is_unbiased_and_used_only_to_train_above_exact_dim():
    torch.manual_seed(0)
    layer = CNF(5, hidden=[8, 8, 8], exact_dim=2).double().train(False)
    x = _x(3, 5)
    t = torch.tensor(0.5, dtype=torch.float64)
    exact = layer.field.dynamics(None, None)(t, x)[1]
    assert layer._probe(x) is None  # not training: exact
    layer.train()
    probes = [layer._probe(x) for _ in range(2000)]
    estimates = torch.stack([layer.field.dynamics(None, p)(t, x)[1] for p in probes])
    se = estimates.std(0) / len(probes) ** 0.5
    assert ((estimates.mean(0) - exact).abs() <= 4 * se).all()
    # A field with at most two hidden layers has a closed-form trace, cheaper than the estimate.
    assert CNF(5, hidden=[8, 8], exact_dim=2).train()._probe(x) is None


def test_round_trip_error_follows_the_stated_tolerance():
    torch.manual_seed(0)
    x = _x(64, 2)
    errors = []
    for tol in (1e-4, 1e-7, 1e-10):
        layer = CNF(2, hidden=[16, 16], rtol=tol, atol=tol).double()
        with torch.no_grad():  # off the identity it starts as
            for p in layer.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3),
                                         dtype=p.dtype))
        with torch.no_grad():
            z, ladj = layer(x)
            back, ladj_back = layer.inverse(z)
        errors.append(float((back - x).abs().max()))
        assert errors[-1] < 100 * tol
        assert float((ladj + ladj_back).abs().max()) < 100 * tol
    assert errors[0] > errors[1] > errors[2]


def test_solver_limits_raise_typed_errors(monkeypatch):
    flow = nfcore.build({"preset": "cnf", "dim": 2, "hidden": [8], "rtol": 1e-12, "atol": 1e-12,
                         "dtype": "float64"})
    with nfcore.time_limit(1e-9), pytest.raises(nfcore.SolverTimeout, match="cnf"):
        flow.log_prob(torch.zeros(2, 2))
    monkeypatch.setattr("nfcore.layers.cnf._MAX_STEPS", 3)
    with pytest.raises(nfcore.ConvergenceError, match="cnf: ODE solve failed"):
        flow.sample(4)


def _two_blobs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 2, generator=g)
    x[: n // 2, 0] += 1.5
    x[n // 2 :, 0] -= 1.5
    return x


def test_flow_matching_is_the_default_for_cnf_and_learns_the_data():
    data = _two_blobs(2000)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "cnf", "dim": 2, "hidden": [32, 32]})
    with torch.no_grad():
        before = float(flow.log_prob(data).mean())
    result = nfcore.fit_density(flow, data, steps=400, batch_size=256, lr=3e-3,
                                validate_every=200)
    assert result.summary["loss_function"] == "flow_matching"
    with torch.no_grad():
        after = float(flow.log_prob(data).mean())
    assert after > before + 0.5, (before, after)
    # The same seed gives the same model.
    torch.manual_seed(0)
    again = nfcore.build({"preset": "cnf", "dim": 2, "hidden": [32, 32]})
    nfcore.fit_density(again, data, steps=400, batch_size=256, lr=3e-3, validate_every=200)
    assert all(torch.equal(a, b) for a, b in zip(flow.state_dict().values(),
                                                 again.state_dict().values(), strict=True))


def test_flow_matching_with_ot_couplings_and_its_limits():
    data = _two_blobs(512)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "cnf", "dim": 2, "hidden": [16]})
    result = nfcore.fit_density(flow, data, steps=20, loss=FlowMatching(ot=True),
                                validation_fraction=0)
    assert result.summary["loss_function"] == "flow_matching+ot"
    cond = nfcore.build({"preset": "cnf", "dim": 2, "context_dim": 1, "hidden": [16]})
    with pytest.raises(ValueError, match="unconditional flow for mini-batch OT"):
        nfcore.fit_density(cond, data, context=torch.zeros(512, 1), steps=2,
                           loss=FlowMatching(ot=True))
    maf = nfcore.build({"preset": "maf", "dim": 2, "hidden": [8]})
    with pytest.raises(ValueError, match="last layer is its only 'cnf' layer"):
        nfcore.fit_density(maf, data, steps=2, loss="flow_matching")
    with pytest.raises(ValueError, match="Expected loss in"):
        nfcore.fit_density(maf, data, steps=2, loss="elbo")


def test_ot_pairing_is_the_optimal_assignment():
    from nfcore.train.flow_matching import _assignment

    x1 = _x(6, 2)
    x0 = x1[torch.tensor([3, 0, 5, 1, 4, 2])] + 1e-3
    assert torch.equal(x0[_assignment(x0, x1)], x1 + 1e-3)


def test_conditional_flow_matching_uses_the_context():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2, (1000, 1), generator=g).double()
    data = (torch.randn(1000, 2, generator=g, dtype=torch.float64) * 0.3
            + torch.cat([4 * c - 2, 0 * c], 1))
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "cnf", "dim": 2, "context_dim": 1, "hidden": [32, 32],
                         "dtype": "float64", "standardize": False})
    nfcore.fit_density(flow, data, context=c, steps=300, lr=3e-3, validation_fraction=0)
    with torch.no_grad():
        right = flow.log_prob(torch.tensor([[2.0, 0.0]]), context=torch.tensor([[1.0]]))
        wrong = flow.log_prob(torch.tensor([[2.0, 0.0]]), context=torch.tensor([[0.0]]))
    assert right > wrong + 3


def test_likelihood_and_reverse_kl_train_through_the_solver():
    data = _two_blobs(400)
    torch.manual_seed(0)
    spec = {"preset": "cnf", "dim": 2, "hidden": [16], "rtol": 1e-4, "atol": 1e-4}
    flow = nfcore.build(spec)
    result = nfcore.fit_density(flow, data, steps=15, loss="likelihood", lr=1e-2,
                                validation_fraction=0)
    assert result.summary["loss_function"] == "likelihood"
    assert result.history[-1]["loss"] < 2.6  # -log N at init is ~2.9 nats on these data
    target_flow = nfcore.build({**spec, "standardize": False})
    fit = nfcore.fit_target(target_flow, "banana", steps=10, batch_size=64, lr=1e-2,
                            ess_samples=500)
    assert fit.summary["gradient"] == "total" and fit.summary["kl"] is not None
    assert all(torch.isfinite(p).all() for p in target_flow.parameters())


def _off_identity(layer: CNF, seed: int = 3, scale: float = 0.5) -> CNF:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed),
                                       dtype=p.dtype))
    return layer


@pytest.mark.parametrize("activation", ["silu", "elu", "tanh", "gelu"])
@pytest.mark.parametrize("hidden", [[16], [16, 16]])
def test_solve_is_torchdiffeqs_solve_of_the_tuple_state(hidden, activation):
    """The flat state [x, l] and its mixed norm take the same steps as torchdiffeq's own tuple
    (x, l) with its default (mixed RMS) norm, with or without autograd."""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    layer = _off_identity(CNF(2, hidden=hidden, activation=activation).double())
    x = _x(128, 2)
    f, calls = layer.field.dynamics(None, None), [0]

    def tuple_rhs(t, state):
        calls[0] += 1
        return f(t, state[0])

    times = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        xs, ls = odeint(tuple_rhs, (x, x.new_zeros(128)), times, rtol=layer.rtol,
                        atol=layer.atol, method="dopri5", options={"step_t": times[1:]})
        z, ladj = layer(x)
    assert layer.evaluations == calls[0]
    assert torch.allclose(z, xs[-1], atol=1e-10) and torch.allclose(ladj, ls[-1], atol=1e-10)
    z_grad, ladj_grad = layer(x.clone().requires_grad_())  # the autograd path
    assert layer.evaluations == calls[0]
    assert torch.allclose(z_grad, z, atol=1e-10) and torch.allclose(ladj_grad, ladj, atol=1e-10)


@pytest.mark.parametrize("activation", ["silu", "tanh"])
@pytest.mark.parametrize("dim", [2, 5])
def test_log_density_converges_to_a_tight_solve(dim, activation):
    """At each tolerance the log-determinant is within 20 (atol + rtol |l|) of a solve at 1e-10
    (measured: at most 14; with an error norm over the state alone, 40 to 85), the state within
    5 (atol + rtol |z|), and the error falls with the tolerance."""
    torch.manual_seed(0)
    spec = {"hidden": [16, 16], "activation": activation}
    reference = _off_identity(CNF(dim, rtol=1e-10, atol=1e-10, **spec).double())
    x = _x(128, dim)
    with torch.no_grad():
        z_ref, ladj_ref = reference(x)
    errors = []
    for tol in (1e-4, 1e-5, 1e-6):
        layer = CNF(dim, rtol=tol, atol=tol / 10, **spec).double()
        layer.load_state_dict(reference.state_dict())
        with torch.no_grad():
            z, ladj = layer(x)
        errors.append(float((ladj - ladj_ref).abs().max()))
        assert errors[-1] < 20 * (tol / 10 + tol * float(ladj_ref.abs().max())), (tol, errors)
        assert float((z - z_ref).abs().max()) < 5 * (tol / 10 + tol * float(z_ref.abs().max()))
    assert errors[0] > errors[1] > errors[2]


def test_float32_solve_follows_the_float64_solve_at_the_served_tolerance():
    """The lean float32 path (in-place buffers, one output product) rounds, it does not drift:
    its log-determinant is within 1e-5 of the same solve in float64."""
    torch.manual_seed(0)
    layer = CNF(2, hidden=[64, 64], activation="elu", rtol=1e-5, atol=1e-6)
    layer.field.linears[-1].reset_parameters()  # a random field, not the identity it starts as
    double = CNF(2, hidden=[64, 64], activation="elu", rtol=1e-5, atol=1e-6).double()
    double.load_state_dict(layer.state_dict())
    x = _x(256, 2)
    with torch.inference_mode():
        _, ladj = layer(x.float())
        _, ladj_double = double(x)
    assert float((ladj.double() - ladj_double).abs().max()) < 1e-5


def test_a_first_solve_in_inference_mode_leaves_autograd_solves_working():
    """In a fresh interpreter, a cnf's first log_prob under ``torch.inference_mode`` (as a server's
    first request or a benchmark makes it) must not break later training: torchdiffeq's module-level
    tableaux were once created on that first call, as inference tensors."""
    import subprocess
    import sys
    from pathlib import Path

    # A float32 first solve, then a float64 training pass (the tableaux' float64 copies are the
    # module-level tensors themselves), with moved parameters so that the step sizes carry grad.
    code = """
import torch, nfcore
flow = nfcore.build({"preset": "cnf", "dim": 2})
with torch.inference_mode():
    flow.log_prob(torch.zeros(3, 2))
torch.manual_seed(0)
flow = nfcore.build({"preset": "cnf", "dim": 3, "dtype": "float64", "hidden": [16, 16]})
with torch.no_grad():
    for p in flow.parameters():
        p.add_(0.3 * torch.randn_like(p))
flow.log_prob(torch.randn(7, 3, dtype=torch.float64)).sum().backward()
assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

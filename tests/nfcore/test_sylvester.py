"""Sylvester layers: both kinds of Q, a low-rank bottleneck, the triangular inverse and its spec."""

import pytest
import torch
from torch.autograd.functional import jacobian

import nfcore
from nfcore.layers import SYLVESTER_TOLERANCE, Sylvester

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)


@pytest.mark.parametrize(("kind", "rank", "reflections"), [
    ("orthogonal", 4, None), ("orthogonal", 2, None), ("householder", None, 3)])
def test_inverse_and_log_det_for_each_kind_of_q(kind, rank, reflections):
    torch.manual_seed(0)
    layer = Sylvester(4, kind=kind, rank=rank, reflections=reflections).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    q = layer._q()
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-12)
    x = _x(32, 4)
    z, ladj = layer(x)
    back, ladj_inv = layer.inverse(z)
    assert torch.allclose(back, x, atol=1e-9) and torch.allclose(ladj, -ladj_inv, atol=1e-9)
    for point in x[:3]:
        expected = torch.linalg.slogdet(jacobian(lambda v: layer(v[None])[0][0], point))[1]
        assert abs(layer(point[None])[1].item() - expected.item()) < 1e-8


def test_inverse_of_far_away_points_meets_the_tolerance():
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "sylvester", "dim": 3, "transforms": 6, "dtype": "float64"})
    data = torch.tensor([[0.3, -4.0, 2.0], [50.0, 2.0, -30.0], [-1e4, 1e4, 3.0]],
                        dtype=torch.float64)
    z, _ = flow.transform(data)
    back, _ = flow.sample_from_noise(z)
    tol = SYLVESTER_TOLERANCE[torch.float64]
    assert torch.allclose(back, data, atol=1e6 * tol, rtol=1e3 * tol)


def test_non_finite_input_raises_a_typed_error():
    layer = Sylvester(2).double()
    with pytest.raises(nfcore.ConvergenceError, match="sylvester"):
        layer(torch.tensor([[float("nan"), 0.0]], dtype=torch.float64))


def test_spec_fills_rank_and_reflections_and_checks_rank():
    spec = nfcore.normalize_spec({"dim": 3, "layers": [{"type": "sylvester"}]})
    assert spec["layers"][0] == {"type": "sylvester", "kind": "orthogonal", "rank": 3,
                                 "reflections": 3, "hidden": [64, 64], "activation": "relu",
                                 "amortize": "diagonals"}
    with pytest.raises(nfcore.SpecError, match=r"layers\[0\].rank: expected at most dim"):
        nfcore.normalize_spec({"dim": 3, "layers": [{"type": "sylvester", "rank": 4}]})
    with pytest.raises(nfcore.SpecError, match=r"layers\[0\].amortize: only a conditional"):
        nfcore.normalize_spec({"dim": 3, "layers": [{"type": "sylvester", "amortize": "all"}]})


def _amortized(kind: str, rank: int | None = None, reflections: int | None = None,
               amortize: str = "all") -> Sylvester:
    """A conditional layer (linear context map, as the paper's encoder heads) moved off its
    start, with a context network strong enough that every context gets a different flow."""
    torch.manual_seed(0)
    layer = Sylvester(4, kind=kind, rank=rank, reflections=reflections, context_dim=3,
                      hidden=[], amortize=amortize).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize(("kind", "rank", "reflections"), [
    ("orthogonal", 4, None), ("orthogonal", 2, None), ("householder", None, 3)])
def test_fully_amortized_layer_is_a_bijection_for_each_context(kind, rank, reflections):
    """With ``amortize="all"`` every row has its own Q, R and R~: each row's Q is orthonormal,
    the inverse undoes the forward map row by row, and each row's log-det is its Jacobian's."""
    layer = _amortized(kind, rank, reflections)
    x = _x(16, 4)
    ctx = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q = layer._params(ctx)[0]
    m = q.shape[-1]
    assert q.shape == (16, 4, m)
    assert torch.allclose(q.mT @ q, torch.eye(m, dtype=torch.float64).expand(16, m, m),
                          atol=1e-12)
    assert not torch.allclose(q[0], q[1])  # Q itself depends on the context
    z, ladj = layer(x, ctx)
    back, ladj_inv = layer.inverse(z, ctx)
    assert torch.allclose(back, x, atol=1e-9) and torch.allclose(ladj, -ladj_inv, atol=1e-9)
    for i in range(3):
        jac = jacobian(lambda v, i=i: layer(v[None], ctx[i:i + 1])[0][0], x[i])
        assert abs(ladj[i].item() - torch.linalg.slogdet(jac)[1].item()) < 1e-8


def test_diagonal_amortization_keeps_q_and_r_shared():
    layer = _amortized("orthogonal", 4, amortize="diagonals")
    ctx = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, u, ut, rd, rtd, b = layer._params(ctx)
    assert q.shape == (4, 4) and u.shape == (4, 4) and ut.shape == (4, 4)
    assert rd.shape == (5, 4) and not torch.allclose(rd[0], rd[1])


def test_fully_amortized_flow_scores_its_samples_and_saves_exactly(tmp_path):
    """Flow level, two fully amortized Householder layers: sampling and scoring agree with a
    per-row context, the context changes the density, and a save/load round trip is exact."""
    torch.manual_seed(0)
    layer = {"type": "sylvester", "kind": "householder", "reflections": 2, "hidden": [],
             "amortize": "all"}
    flow = nfcore.build({"dim": 3, "context_dim": 2, "dtype": "float64",
                         "layers": [layer, layer]})
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ctx = torch.randn(6, 2, dtype=torch.float64)
    xs, log_q = flow.sample_and_log_prob(6, context=ctx)
    assert torch.allclose(flow.log_prob(xs, context=ctx), log_q, atol=1e-9)
    assert not torch.allclose(flow.log_prob(xs, context=-ctx), log_q)
    nfcore.save(flow, tmp_path / "m.safetensors")
    loaded = nfcore.load(tmp_path / "m.safetensors")
    assert loaded.spec == flow.spec and loaded.spec["layers"][0]["amortize"] == "all"
    assert torch.equal(loaded.log_prob(xs, context=ctx), flow.log_prob(xs, context=ctx))


@pytest.mark.parametrize("amortize", ["diagonals", "all"])
def test_reset_identity_is_the_identity_for_every_context_and_can_learn(amortize):
    layer = _amortized("householder", reflections=3, amortize=amortize)
    assert layer.reset_identity()
    x = _x(8, 4)
    ctx = 10 * torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z, ladj = layer.inverse(x, ctx)
    assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(8, dtype=torch.float64))
    # Not a dead start: the loss's gradient reaches R (through which the rest then learns).
    (z * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum().backward()
    assert layer.r_diag.grad.abs().sum() > 0

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
                                 "reflections": 3, "hidden": [64, 64], "activation": "relu"}
    with pytest.raises(nfcore.SpecError, match=r"layers\[0\].rank: expected at most dim"):
        nfcore.normalize_spec({"dim": 3, "layers": [{"type": "sylvester", "rank": 4}]})

"""Built-in targets (formulas, the soft wall, log Z by quadrature, exact samplers) and the registry."""

from __future__ import annotations

import math

import pytest
import torch

import nfcore
from nfcore.errors import TargetError
from nfcore.targets import LOG_Z, WALL, WALL_WIDTH, Target

pytestmark = pytest.mark.usefixtures("one_thread")


def _simpson(n: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return x, w * (hi - lo) / (n - 1) / 3.0


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_log_z_constants_match_independent_grid_quadrature(name):
    # Simpson's rule on a dense grid in float64 torch: independent of the scipy run that made LOG_Z.
    a, wa = _simpson(1601, -4.5 - 12 * WALL_WIDTH, 4.5 + 12 * WALL_WIDTH)
    b, wb = _simpson(2001, -10.0, 10.0)
    A, B = torch.meshgrid(a, b, indexing="ij")
    log_p = nfcore.targets.get(name).log_prob(torch.stack([A.reshape(-1), B.reshape(-1)], -1))
    z = (wa[:, None] * wb[None, :] * log_p.reshape(A.shape).exp()).sum()
    assert abs(math.log(float(z)) - LOG_Z[name]) < 1e-5
    assert nfcore.targets.get(name).log_z == LOG_Z[name]


def _paper_u(name: str, z: torch.Tensor) -> torch.Tensor:
    """Rezende & Mohamed (2015) Table 1, written out again from the paper."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    if name == "U1":
        return (0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
                - torch.log(torch.exp(-0.5 * ((z1 - 2) / 0.6) ** 2)
                            + torch.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)))
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2
    if name == "U3":
        return -torch.log(torch.exp(-0.5 * ((z2 - w1) / 0.35) ** 2)
                          + torch.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    return -torch.log(torch.exp(-0.5 * ((z2 - w1) / 0.4) ** 2)
                      + torch.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_u_targets_follow_the_paper_inside_the_wall(name):
    g = torch.Generator().manual_seed(1)
    z = (torch.rand(500, 2, generator=g, dtype=torch.float64) * 2 - 1) * torch.tensor([WALL, 3.0])
    torch.testing.assert_close(nfcore.targets.get(name).log_prob(z), -_paper_u(name, z))


@pytest.mark.parametrize("name", ["U2", "U3", "U4"])
def test_soft_wall_is_the_documented_half_gaussian(name):
    t = nfcore.targets.get(name)
    z1 = torch.tensor([-6.0, -4.6, 4.3, 5.0], dtype=torch.float64)
    z = torch.stack([z1, torch.sin(0.5 * math.pi * z1)], -1)
    wall = 0.5 * ((z1.abs() - WALL) / WALL_WIDTH) ** 2
    torch.testing.assert_close(t.log_prob(z), -_paper_u(name, z) - wall)


def test_wall_width_is_stated():
    assert (WALL, WALL_WIDTH) == (4.0, 0.25)
    assert "0.25" in nfcore.targets.builtins.__doc__


@pytest.mark.parametrize("dim", [2, 5])
def test_funnel_density_and_exact_samples(dim):
    t = nfcore.targets.get("funnel", dim=dim)
    assert t.dim == dim and t.has_sampler
    x = t.sample(20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, dim)
    v = x[:, 0]
    assert abs(float(v.mean())) < 0.1 and abs(float(v.std()) - 3.0) < 0.1
    # z_i / exp(v/2) must be standard normal.
    scaled = x[:, 1:] * torch.exp(-0.5 * v)[:, None]
    assert abs(float(scaled.std()) - 1.0) < 0.03
    # Normalized density = N(v; 0, 9) * prod N(z_i; 0, exp(v)).
    ref = torch.distributions.Normal(0.0, 3.0).log_prob(v) + torch.distributions.Normal(
        0.0, torch.exp(0.5 * v)[:, None]).log_prob(x[:, 1:]).sum(-1)
    torch.testing.assert_close(t.log_prob(x) - t.log_z, ref)


def test_banana_and_mixture_are_normalized_with_consistent_samples():
    for t in (nfcore.targets.get("banana"), nfcore.targets.get("gaussian_mixture")):
        a, wa = _simpson(1201, -12.0, 12.0)
        b, wb = _simpson(1201, -12.0, 30.0)
        A, B = torch.meshgrid(a, b, indexing="ij")
        lp = t.log_prob(torch.stack([A.reshape(-1), B.reshape(-1)], -1)).reshape(A.shape)
        assert abs(math.log(float((wa[:, None] * wb[None, :] * lp.exp()).sum())) - t.log_z) < 1e-4
        x = t.sample(50_000, torch.Generator().manual_seed(3))
        # E_p[log p] by samples vs by quadrature: catches a sampler that disagrees with log_prob.
        by_samples = float((t.log_prob(x) - t.log_z).mean())
        p = (lp - t.log_z).exp()
        by_grid = float((wa[:, None] * wb[None, :] * p * (lp - t.log_z)).sum())
        assert abs(by_samples - by_grid) < 0.03


def test_mixture_in_higher_dimension():
    t = nfcore.targets.get("gaussian_mixture", dim=4, components=3)
    assert t.dim == 4 and t.sample(7).shape == (7, 4)
    assert t.log_prob(torch.zeros(2, 4)).shape == (2,)


def test_names_and_case_insensitive_lookup():
    names = nfcore.targets.names()
    for name in ("U1", "U2", "U3", "U4", "funnel", "banana", "gaussian_mixture"):
        assert name in names
    assert nfcore.targets.get("u3").name == "U3"


def test_unknown_target_and_bad_options_are_target_errors():
    with pytest.raises(TargetError, match="Unknown target 'nope'; known targets: U1"):
        nfcore.targets.get("nope")
    with pytest.raises(TargetError, match="Bad options"):
        nfcore.targets.get("U1", dim=3)
    with pytest.raises(TargetError, match="dim >= 2"):
        nfcore.targets.get("funnel", dim=1)
    with pytest.raises(TargetError):
        nfcore.targets.get(3)


def test_target_checks_shapes_and_sampling():
    t = nfcore.targets.get("U1")
    with pytest.raises(TargetError, match=r"shape \(N, 2\)"):
        t.log_prob(torch.zeros(3, 3))
    with pytest.raises(TargetError, match="no exact sampler"):
        t.sample(3)
    bad = Target("bad", 2, lambda z: z)
    with pytest.raises(TargetError, match=r"must return a tensor of shape \(4,\)"):
        bad.log_prob(torch.zeros(4, 2))
    with pytest.raises(TargetError):
        Target("x", 0, lambda z: z[:, 0])


def test_plugins_register_replace_and_cannot_shadow_builtins():
    try:
        t = nfcore.targets.register("test_ring", lambda z: -(z.norm(dim=-1) - 1) ** 2, dim=2,
                                    log_z=0.5)
        assert nfcore.targets.get("test_ring") is t and t.log_z == 0.5
        assert "test_ring" in nfcore.targets.names()
        assert nfcore.targets.get("TEST_RING").log_prob(torch.ones(3, 2)).shape == (3,)
        with pytest.raises(TargetError, match="already registered"):
            nfcore.targets.register("test_ring", lambda z: z[:, 0], dim=2)
        nfcore.targets.register("test_ring", nfcore.targets.get("banana"), dim=2, replace=True)
        assert nfcore.targets.get("test_ring").log_z == nfcore.targets.get("banana").log_z
        with pytest.raises(TargetError, match="dim=3 but the target has dim 2"):
            nfcore.targets.register("test_other", nfcore.targets.get("banana"), dim=3)
        with pytest.raises(TargetError, match="built-in"):
            nfcore.targets.register("u1", lambda z: z[:, 0], dim=2)
        with pytest.raises(TargetError, match="plugin name"):
            nfcore.targets.register("../evil", lambda z: z[:, 0], dim=2)
        with pytest.raises(TargetError, match="Target or a callable"):
            nfcore.targets.register("test_x", 3, dim=2)
    finally:
        nfcore.targets.unregister("test_ring")
    assert "test_ring" not in nfcore.targets.names()


def test_from_spec_builds_builtins_and_expressions_and_rejects_the_rest():
    t = nfcore.targets.from_spec({"builtin": "funnel", "options": {"dim": 4}})
    assert t.dim == 4 and t.spec == {"builtin": "funnel", "options": {"dim": 4}}
    assert nfcore.targets.from_spec({"builtin": "u2"}).spec == {"builtin": "U2"}
    e = nfcore.targets.from_spec({"dim": 2, "log_prob": "-sum(z**2)", "constants": {"a": 1}})
    assert e.spec == {"dim": 2, "log_prob": "-sum(z**2)", "constants": {"a": 1}}
    for bad, message in [
        ({"builtin": "U1", "dim": 2}, "unknown keys"),
        ({"builtin": "U1", "options": 3}, "options"),
        ({"dim": 2}, "expected"),
        ({"log_prob": "z[0]", "dim": 1, "extra": 1}, "expected"),
        ([], "Expected a target object"),
    ]:
        with pytest.raises(TargetError, match=message):
            nfcore.targets.from_spec(bad)
    with pytest.raises(nfcore.ExpressionError):
        nfcore.targets.from_spec({"dim": 2, "log_prob": "z.x"})

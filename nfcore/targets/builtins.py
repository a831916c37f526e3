"""Built-in targets: U1-U4 of Rezende & Mohamed (2015, Table 1), Neal's funnel, a banana and a
Gaussian mixture, each with its log normalizing constant.

**The soft wall.** U2, U3 and U4 constrain ``z2`` around a curve in ``z1`` but leave ``z1`` free, so
``exp(-U)`` does not integrate. We confine them to ``|z1| <= 4`` by adding a half-Gaussian wall,

    log p~(z) = -U(z) - 0.5 * (max(|z1| - 4, 0) / 0.25) ** 2,

which leaves the density untouched inside ``|z1| <= 4`` and makes it fall off like a Gaussian of
standard deviation ``WALL_WIDTH = 0.25`` outside (about 3 % of the mass lies beyond the wall). U1
decays in every direction and has no wall. Plots of U2-U4 in the paper show ``|z1| <= 4``.

**log Z.** ``LOG_Z`` holds ``log int p~(z) dz`` for U1-U4, computed once with
``scipy.integrate.dblquad`` (``epsabs=1e-11, epsrel=1e-11``) over ``[-4.5-12*0.25, 4.5+12*0.25] x
[-12, 12]``, split at ``z1 = -4, 0, 4`` (see ``quadrature_log_z``). The test suite recomputes them by
dense Simpson quadrature in float64 torch, without scipy. The funnel, banana and mixture have
closed-form constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import TargetError
from .base import Target

__all__ = ["WALL_WIDTH", "WALL", "LOG_Z", "BUILTINS", "u1", "u2", "u3", "u4", "funnel", "banana",
           "gaussian_mixture", "quadrature_log_z"]

WALL = 4.0
WALL_WIDTH = 0.25
_LOG_2PI = math.log(2.0 * math.pi)

#: ``log Z`` of U1-U4 by quadrature (see the module docstring); recomputed by ``quadrature_log_z``.
LOG_Z = {
    "U1": 1.8775016261097075,
    "U2": 2.1575048696968557,
    "U3": 2.7171206576322784,
    "U4": 2.7861135291192296,
}


def _wall(z1: Tensor) -> Tensor:
    return 0.5 * (torch.relu(z1.abs() - WALL) / WALL_WIDTH) ** 2


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(0.5 * math.pi * z1)


def _w2(z1: Tensor) -> Tensor:
    return 3.0 * torch.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)


def _w3(z1: Tensor) -> Tensor:
    return 3.0 * torch.sigmoid((z1 - 1.0) / 0.3)


def _u1(z: Tensor) -> Tensor:
    z1 = z[:, 0]
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2.0) / 0.4) ** 2
    lobes = torch.logaddexp(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)
    return -ring + lobes


def _u2(z: Tensor) -> Tensor:
    z1, z2 = z[:, 0], z[:, 1]
    return -0.5 * ((z2 - _w1(z1)) / 0.4) ** 2 - _wall(z1)


def _u3(z: Tensor) -> Tensor:
    z1, z2 = z[:, 0], z[:, 1]
    w1 = _w1(z1)
    return torch.logaddexp(-0.5 * ((z2 - w1) / 0.35) ** 2,
                           -0.5 * ((z2 - w1 + _w2(z1)) / 0.35) ** 2) - _wall(z1)


def _u4(z: Tensor) -> Tensor:
    z1, z2 = z[:, 0], z[:, 1]
    w1 = _w1(z1)
    return torch.logaddexp(-0.5 * ((z2 - w1) / 0.4) ** 2,
                           -0.5 * ((z2 - w1 + _w3(z1)) / 0.35) ** 2) - _wall(z1)


def u1() -> Target:
    """U1: a ring of radius 2 with two lobes on the z1 axis. ``log p~ = -U1``."""
    return Target("U1", 2, _u1, log_z=LOG_Z["U1"], description="Rezende & Mohamed U1")


def u2() -> Target:
    """U2: a sine-shaped ridge, confined to ``|z1| <= 4`` by the soft wall."""
    return Target("U2", 2, _u2, log_z=LOG_Z["U2"], description="Rezende & Mohamed U2, walled")


def u3() -> Target:
    """U3: two sine-shaped ridges split by a bump, confined to ``|z1| <= 4`` by the soft wall."""
    return Target("U3", 2, _u3, log_z=LOG_Z["U3"], description="Rezende & Mohamed U3, walled")


def u4() -> Target:
    """U4: two sine-shaped ridges split by a sigmoid step, confined by the soft wall."""
    return Target("U4", 2, _u4, log_z=LOG_Z["U4"], description="Rezende & Mohamed U4, walled")


def funnel(dim: int = 10, scale: float = 3.0) -> Target:
    """Neal's funnel: ``v = z0 ~ N(0, scale^2)``, ``z_i | v ~ N(0, exp(v))`` for ``i >= 1``.

    References: Neal, "Slice sampling" (2003), §8.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise TargetError(f"funnel: expected an integer dim >= 2; got {dim!r}")
    k = dim - 1

    def log_prob(z: Tensor) -> Tensor:
        v, x = z[:, 0], z[:, 1:]
        return -0.5 * (v / scale) ** 2 - 0.5 * k * v - 0.5 * (x * x).sum(-1) * torch.exp(-v)

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        v = scale * torch.randn(n, 1, generator=generator, dtype=torch.float64)
        x = torch.randn(n, k, generator=generator, dtype=torch.float64) * torch.exp(0.5 * v)
        return torch.cat([v, x], dim=-1)

    log_z = math.log(scale) + 0.5 * dim * _LOG_2PI
    return Target("funnel", dim, log_prob, log_z=log_z, sampler=sample,
                  description=f"Neal's funnel in {dim} dimensions")


def banana(curvature: float = 0.5) -> Target:
    """A 2-D banana: ``z0 ~ N(0, 2^2)`` and ``z1 | z0 ~ N(curvature * (z0^2 - 4), 0.5^2)``."""

    def log_prob(z: Tensor) -> Tensor:
        z0, z1 = z[:, 0], z[:, 1]
        return -0.5 * (z0 / 2.0) ** 2 - 0.5 * ((z1 - curvature * (z0 * z0 - 4.0)) / 0.5) ** 2

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        e = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        z0 = 2.0 * e[:, 0]
        return torch.stack([z0, curvature * (z0 * z0 - 4.0) + 0.5 * e[:, 1]], dim=-1)

    return Target("banana", 2, log_prob, log_z=math.log(2.0 * math.pi * 2.0 * 0.5), sampler=sample,
                  description="twisted Gaussian")


def gaussian_mixture(dim: int = 2, components: int = 4, radius: float = 2.5,
                     std: float = 0.6) -> Target:
    """Equal-weight mixture of isotropic Gaussians with means on a circle of ``radius`` in the first
    two coordinates (0 elsewhere). Normalized: ``log_z = 0``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise TargetError(f"gaussian_mixture: expected an integer dim >= 2; got {dim!r}")
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise TargetError(f"gaussian_mixture: expected a positive integer components; "
                          f"got {components!r}")
    angles = torch.arange(components, dtype=torch.float64) * (2.0 * math.pi / components)
    means = torch.zeros(components, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * torch.cos(angles), radius * torch.sin(angles)
    const = -math.log(components) - dim * math.log(std) - 0.5 * dim * _LOG_2PI

    def log_prob(z: Tensor) -> Tensor:
        d = (z[:, None, :] - means.to(z)) / std
        return torch.logsumexp(-0.5 * (d * d).sum(-1), dim=-1) + const

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.randint(components, (n,), generator=generator)
        return means[k] + std * torch.randn(n, dim, generator=generator, dtype=torch.float64)

    return Target("gaussian_mixture", dim, log_prob, log_z=0.0, sampler=sample,
                  description=f"{components}-component Gaussian mixture")


#: Built-in name -> factory. Factories take keyword options (e.g. ``funnel(dim=5)``).
BUILTINS: dict[str, Callable[..., Target]] = {
    "U1": u1, "U2": u2, "U3": u3, "U4": u4,
    "funnel": funnel, "banana": banana, "gaussian_mixture": gaussian_mixture,
}


def quadrature_log_z(name: str) -> float:  # pragma: no cover - run once to fill in LOG_Z
    """Recompute ``LOG_Z[name]`` with scipy's adaptive quadrature (scipy is not a runtime need)."""
    from scipy import integrate

    target = BUILTINS[name]()

    def density(z2: float, z1: float) -> float:
        z = torch.tensor([[z1, z2]], dtype=torch.float64)
        return math.exp(float(target.log_prob(z)[0]))

    edge = WALL + 0.5 + 12.0 * WALL_WIDTH
    cuts = [-edge, -WALL, 0.0, WALL, edge]
    total = 0.0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        total += integrate.dblquad(density, lo, hi, -12.0, 12.0, epsabs=1e-11, epsrel=1e-11)[0]
    return math.log(total)

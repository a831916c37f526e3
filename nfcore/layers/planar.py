"""Planar and radial flows (Rezende & Mohamed 2015), invertible in both directions.

Both are defined generatively, ``x = g(z)``, so sampling is closed form. Scoring data needs
``z = g^{-1}(x)``, which reduces to a scalar root: for planar flows a safeguarded Newton solve on
``a = w.z + b`` (to ``tol`` below), for radial flows the positive root of a quadratic in ``r``.
Gradients through the planar solve use the implicit function theorem: one differentiable Newton
step from the detached root gives exact first derivatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Layer

__all__ = ["Planar", "Radial", "PLANAR_TOLERANCE"]

#: Residual tolerance of the planar root solve, |a + k tanh(a) - c| <= tol * (1 + |c|).
PLANAR_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
_MAX_ITERATIONS = 100
_EPS = 1e-4  # keeps w.u_hat >= -1 + eps, so the Jacobian is never singular


class Planar(Layer):
    """``x = z + u_hat * tanh(w.z + b)`` with ``u_hat`` reparametrised so ``w.u_hat > -1``.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows" (2015), §4.1
    and Appendix A.1.

    Arguments:
        dim: number of features.

    Example:
        >>> import torch
        >>> from nfcore.layers import Planar
        >>> layer = Planar(3).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    fast_forward = False
    row_wise = False  # its solver stops on a batch-wide rule

    def __init__(self, dim: int, **_):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        w = torch.empty(dim).uniform_(-bound, bound)
        # Near-identity start: u_hat = 0 exactly when u = log(e - 1) w / |w|^2 (then m(w.u) = 0).
        # Deep stacks (K = 32) started from random u_hat begin far from the base and, trained by
        # reverse KL, collapse onto one mode; from here they do not (benchmarks/paper_6_1.py).
        u = math.log(math.e - 1.0) * w / (w @ w) + 0.01 * torch.randn(dim)
        self.u = nn.Parameter(u)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(()))

    def _u_hat(self) -> tuple[Tensor, Tensor]:
        wu = self.w @ self.u
        m = -1.0 + _EPS + F.softplus(wu)
        u_hat = self.u + (m - wu) * self.w / (self.w @ self.w).clamp(min=1e-12)
        return u_hat, self.w @ u_hat

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u_hat, k = self._u_hat()
        t = torch.tanh(z @ self.w + self.b)
        x = z + t[:, None] * u_hat
        return x, torch.log1p(k * (1.0 - t * t))

    def _solve(self, c: Tensor, k: Tensor) -> Tensor:
        """Root of ``a + k tanh(a) = c``, monotone in ``a`` since ``k > -1``."""
        tol = PLANAR_TOLERANCE.get(c.dtype, 1e-6)
        spread = k.abs()
        lo, hi, a = c - spread, c + spread, c.clone()
        for _ in range(_MAX_ITERATIONS):
            t = torch.tanh(a)
            f = a + k * t - c
            if bool((f.abs() <= tol * (1.0 + c.abs())).all()):
                break
            hi = torch.where(f > 0, a, hi)
            lo = torch.where(f > 0, lo, a)
            step = a - f / (1.0 + k * (1.0 - t * t))
            a = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        return a

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u_hat, k = self._u_hat()
        c = x @ self.w + self.b
        with torch.no_grad():
            a = self._solve(c.detach(), k.detach())
        t = torch.tanh(a)
        a = a - (a + k * t - c) / (1.0 + k * (1.0 - t * t))  # differentiable Newton step
        t = torch.tanh(a)
        z = x - t[:, None] * u_hat
        return z, -torch.log1p(k * (1.0 - t * t))


class Radial(Layer):
    """``x = z + beta * (z - z0) / (alpha + |z - z0|)`` with ``alpha > 0`` and ``beta > -alpha``.

    The inverse solves ``r + beta r / (alpha + r) = |x - z0|`` for ``r >= 0``: a quadratic whose
    positive root is taken in closed form, in a cancellation-free arrangement.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows" (2015), §4.1
    and Appendix A.2.

    Arguments:
        dim: number of features.

    Example:
        >>> import torch
        >>> from nfcore.layers import Radial
        >>> layer = Radial(3).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    fast_forward = True

    def __init__(self, dim: int, **_):
        super().__init__()
        self.dim = dim
        bound = 1.0 / math.sqrt(dim)
        self.z0 = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.alpha_raw = nn.Parameter(torch.empty(()).uniform_(-bound, bound))
        self.beta_raw = nn.Parameter(torch.empty(()).uniform_(-bound, bound))

    def _alpha_beta(self) -> tuple[Tensor, Tensor]:
        alpha = F.softplus(self.alpha_raw) + 1e-6
        beta = -alpha + F.softplus(self.beta_raw) + 1e-6
        return alpha, beta

    def _ladj(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1.0 / (alpha + r)
        return (self.dim - 1) * torch.log1p(beta * h) + torch.log1p(beta * alpha * h * h)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        alpha, beta = self._alpha_beta()
        d = z - self.z0
        r = torch.linalg.vector_norm(d, dim=-1)
        x = z + (beta / (alpha + r))[:, None] * d
        return x, self._ladj(r, alpha, beta)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        alpha, beta = self._alpha_beta()
        d = x - self.z0
        rho = torch.linalg.vector_norm(d, dim=-1)
        # r^2 + (alpha + beta - rho) r - rho alpha = 0
        b = alpha + beta - rho
        root = torch.sqrt(b * b + 4.0 * rho * alpha)
        r = torch.where(b < 0, 0.5 * (root - b), 2.0 * rho * alpha / (b + root))
        z = self.z0 + d / (1.0 + beta / (alpha + r))[:, None]
        return z, -self._ladj(r, alpha, beta)

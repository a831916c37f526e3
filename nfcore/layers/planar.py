"""Planar and radial flows (Rezende & Mohamed 2015), invertible in both directions.

Both are defined generatively, ``x = g(z)``, so sampling is closed form. Scoring data needs
``z = g^{-1}(x)``, which reduces to a scalar root: for planar flows a safeguarded Newton solve on
``a = w.z + b`` (to ``tol`` below), for radial flows the positive root of a quadratic in ``r``.
Gradients through the planar solve use the implicit function theorem: one differentiable Newton
step from the detached root gives exact first derivatives.

With a context (``context_dim > 0``) both are amortised as in the paper's §6.2: a small network of
the context (``hidden`` widths; ``[]`` for the paper's linear map) shifts every parameter, so each
row has its own ``u, w, b`` (planar) or ``z0, alpha, beta`` (radial). The invertibility
constraints (``w.u_hat > -1``, ``beta > -alpha``) are applied per row after the shift, so they
hold for every context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MLP, Layer

__all__ = ["Planar", "Radial", "PLANAR_TOLERANCE"]

#: Residual tolerance of the planar root solve, |a + k tanh(a) - c| <= tol * (1 + |c|).
PLANAR_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
_MAX_ITERATIONS = 100
_EPS = 1e-4  # keeps w.u_hat >= -1 + eps, so the Jacobian is never singular


def _context_net(context_dim: int, out: int, hidden: list[int] | None,
                 activation: str) -> MLP | None:
    """The network that maps a context to the shifts of a layer's ``out`` raw parameters, started
    small (a tenth of the default output weights, zero bias) so the context shifts the layer's
    own parameters rather than replacing them at the start."""
    if not context_dim:
        return None
    net = MLP(context_dim, out, list([64, 64] if hidden is None else hidden), activation)
    with torch.no_grad():
        net[-1].weight.mul_(0.1)
        net[-1].bias.zero_()
    return net


def _dot(x: Tensor, w: Tensor) -> Tensor:
    """Row-wise ``x . w`` for one shared ``w`` (a matrix-vector product) or one ``w`` per row."""
    return x @ w if w.ndim == 1 else (x * w).sum(-1)


class Planar(Layer):
    """``x = z + u_hat * tanh(w.z + b)`` with ``u_hat`` reparametrised so ``w.u_hat > -1``.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows" (2015), §4.1,
    §6.2 (parameters from the inference network) and Appendix A.1.

    Arguments:
        dim: number of features.
        hidden, activation: the context network (with ``context_dim > 0`` only); ``[]`` is linear.
        context_dim: size of the optional context vector.

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

    def __init__(self, dim: int, *, hidden: list[int] | None = None, activation: str = "relu",
                 context_dim: int = 0, **_):
        super().__init__()
        self.dim = dim
        bound = 1.0 / math.sqrt(dim)
        w = torch.empty(dim).uniform_(-bound, bound)
        # Near-identity start: u_hat = 0 exactly when u = log(e - 1) w / |w|^2 (then m(w.u) = 0).
        # Deep stacks (K = 32) started from random u_hat begin far from the base and, trained by
        # reverse KL, collapse onto one mode; from here they do not (benchmarks/paper_6_1.py).
        u = math.log(math.e - 1.0) * w / (w @ w) + 0.01 * torch.randn(dim)
        self.u = nn.Parameter(u)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(()))
        self.context = _context_net(context_dim, 2 * dim + 1, hidden, activation)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``u, w`` of shape ``(dim,)`` and ``b`` of shape ``()``; with a context, ``(N, dim)``
        and ``(N,)``: one set per row."""
        if self.context is None:
            return self.u, self.w, self.b
        du, dw, db = self.context(context).split([self.dim, self.dim, 1], dim=-1)
        return self.u + du, self.w + dw, self.b + db[..., 0]

    @staticmethod
    def _u_hat_of(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """``u_hat`` with ``k = w.u_hat = -1 + eps + softplus(w.u) > -1``, row by row."""
        wu = (w * u).sum(-1)
        m = -1.0 + _EPS + F.softplus(wu)
        u_hat = u + ((m - wu) / (w * w).sum(-1).clamp(min=1e-12))[..., None] * w
        return u_hat, (w * u_hat).sum(-1)

    def _u_hat(self, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, w, _ = self._params(context)
        return self._u_hat_of(u, w)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, w, b = self._params(context)
        u_hat, k = self._u_hat_of(u, w)
        t = torch.tanh(_dot(z, w) + b)
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
        u, w, b = self._params(context)
        u_hat, k = self._u_hat_of(u, w)
        c = _dot(x, w) + b
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

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows" (2015), §4.1,
    §6.2 and Appendix A.2.

    Arguments:
        dim: number of features.
        hidden, activation: the context network (with ``context_dim > 0`` only); ``[]`` is linear.
        context_dim: size of the optional context vector.

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

    def __init__(self, dim: int, *, hidden: list[int] | None = None, activation: str = "relu",
                 context_dim: int = 0, **_):
        super().__init__()
        self.dim = dim
        bound = 1.0 / math.sqrt(dim)
        self.z0 = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.alpha_raw = nn.Parameter(torch.empty(()).uniform_(-bound, bound))
        self.beta_raw = nn.Parameter(torch.empty(()).uniform_(-bound, bound))
        self.context = _context_net(context_dim, dim + 2, hidden, activation)

    def _params(self, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``z0``, ``alpha > 0`` and ``beta >= -alpha``: shared, or with a context one per row
        (shapes ``(N, dim)``, ``(N,)``, ``(N,)``)."""
        z0, alpha_raw, beta_raw = self.z0, self.alpha_raw, self.beta_raw
        if self.context is not None:
            dz0, da, db = self.context(context).split([self.dim, 1, 1], dim=-1)
            z0, alpha_raw, beta_raw = z0 + dz0, alpha_raw + da[..., 0], beta_raw + db[..., 0]
        alpha = F.softplus(alpha_raw) + 1e-6
        beta = -alpha + F.softplus(beta_raw) + 1e-6
        return z0, alpha, beta

    def _alpha_beta(self, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._params(context)[1:]

    def _ladj(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1.0 / (alpha + r)
        return (self.dim - 1) * torch.log1p(beta * h) + torch.log1p(beta * alpha * h * h)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z0, alpha, beta = self._params(context)
        d = z - z0
        r = torch.linalg.vector_norm(d, dim=-1)
        x = z + (beta / (alpha + r))[:, None] * d
        return x, self._ladj(r, alpha, beta)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z0, alpha, beta = self._params(context)
        d = x - z0
        rho = torch.linalg.vector_norm(d, dim=-1)
        # r^2 + (alpha + beta - rho) r - rho alpha = 0
        b = alpha + beta - rho
        root = torch.sqrt(b * b + 4.0 * rho * alpha)
        r = torch.where(b < 0, 0.5 * (root - b), 2.0 * rho * alpha / (b + root))
        z = z0 + d / (1.0 + beta / (alpha + r))[:, None]
        return z, -self._ladj(r, alpha, beta)

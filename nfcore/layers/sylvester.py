"""Sylvester flows (van den Berg et al. 2018): planar flows with an M-dimensional bottleneck.

The generative map is ``x = z + Q R tanh(R~ Q^T z + b)`` with ``Q`` a ``dim x M`` matrix of
orthonormal columns and ``R``, ``R~`` upper triangular. By Sylvester's determinant identity (the
matrix determinant lemma's generalisation) ``det(dx/dz) = det(I_M + diag(h') R~ R)``, and since
``R~ R`` is upper triangular that is ``prod_i (1 + h'_i R~_ii R_ii)``: one pass, exact. The
diagonals are ``tanh`` of free parameters, so ``R_ii R~_ii > -1`` and the map is invertible.

Scoring data needs ``z`` from ``x``. The part of ``z`` outside the span of ``Q`` equals that of
``x``; inside it, ``w = Q^T z`` solves ``w + R tanh(R~ w + b) = Q^T x``, a triangular system:
``w_M`` first, then ``w_{M-1}``, each a monotone scalar root found by safeguarded Newton to
``SYLVESTER_TOLERANCE``. Gradients through the solve use one differentiable Newton step on the
whole system from the detached root (exact first derivatives by the implicit function theorem).

``Q`` comes from the QR factorisation of a free matrix (``kind="orthogonal"``, any ``rank`` M up
to ``dim``) or is a product of ``reflections`` Householder reflections (``kind="householder"``,
M = ``dim``). With a context, an MLP of the context shifts ``b`` and the diagonals of ``R`` and
``R~`` (the amortised form of the paper).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConvergenceError
from ..limits import check_deadline
from .base import MLP, Layer

__all__ = ["Sylvester", "SYLVESTER_TOLERANCE"]

#: Residual tolerance of each scalar root, ``|f(w_i)| <= tol * (1 + |s_i|)``.
SYLVESTER_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
_MAX_ITERATIONS = 100


class Sylvester(Layer):
    """``x = z + Q R tanh(R~ Q^T z + b)``, inverted numerically so that it can score data.

    References: van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for
    Variational Inference" (2018).

    Arguments:
        dim: number of features.
        kind: ``orthogonal`` (``Q`` from a QR factorisation) or ``householder``.
        rank: M, the number of orthonormal columns of an ``orthogonal`` ``Q`` (default ``dim``).
        reflections: the number of Householder reflections of a ``householder`` ``Q``.
        hidden, activation: the context network (with ``context_dim > 0`` only).
        context_dim: size of the optional context vector.

    Example:
        >>> import torch
        >>> from nfcore.layers import Sylvester
        >>> layer = Sylvester(3, rank=2).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    fast_forward = False
    row_wise = False  # its solver stops on a batch-wide rule

    def __init__(self, dim: int, *, kind: str = "orthogonal", rank: int | None = None,
                 reflections: int | None = None, hidden: list[int] | None = None,
                 activation: str = "relu", context_dim: int = 0, **_):
        super().__init__()
        self.kind = kind
        m = dim if kind == "householder" else (rank or dim)
        self.rank = m
        if kind == "householder":
            self.vectors = nn.Parameter(torch.randn(reflections or dim, dim))
        else:
            self.q = nn.Parameter(torch.randn(dim, m))
        bound = 1.0 / math.sqrt(m)
        self.r_upper = nn.Parameter(torch.empty(m, m).uniform_(-bound, bound) * 0.1)
        self.rt_upper = nn.Parameter(torch.empty(m, m).uniform_(-bound, bound) * 0.1)
        # Near the identity: R's diagonal starts small, R~'s does not, so both get gradients.
        self.r_diag = nn.Parameter(torch.empty(m).uniform_(-0.1, 0.1))
        self.rt_diag = nn.Parameter(torch.empty(m).uniform_(0.5, 1.0))
        self.b = nn.Parameter(torch.zeros(m))
        self.context = None
        if context_dim:
            self.context = MLP(context_dim, 3 * m, list(hidden or [64, 64]), activation)
            with torch.no_grad():  # a small start: the context shifts, it does not dominate
                self.context[-1].weight.mul_(0.1)
                self.context[-1].bias.zero_()

    # ------------------------------------------------------------------ parameters
    def _q(self) -> Tensor:
        if self.kind == "householder":
            v = self.vectors
            q = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
            for vk in v:
                q = q - (2.0 / (vk @ vk).clamp(min=1e-12)) * torch.outer(q @ vk, vk)
            return q
        q, r = torch.linalg.qr(self.q)
        # The sign convention makes Q a smooth function of the parameter.
        return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Strict upper parts of R and R~ (shared), and per-row diagonals and shift b."""
        r_raw, rt_raw, b = self.r_diag[None], self.rt_diag[None], self.b[None]
        if self.context is not None:
            dr, drt, db = self.context(context).chunk(3, dim=-1)
            r_raw, rt_raw, b = r_raw + dr, rt_raw + drt, b + db
        return (self.r_upper.triu(1), self.rt_upper.triu(1), torch.tanh(r_raw),
                torch.tanh(rt_raw), b)

    # ------------------------------------------------------------------ directions
    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q = self._q()
        u, ut, rd, rtd, b = self._params(context)
        w = z @ q
        a = w @ ut.T + rtd * w + b
        h = torch.tanh(a)
        x = z + (h @ u.T + rd * h) @ q.T
        return x, torch.log1p((1.0 - h * h) * rd * rtd).sum(-1)

    @torch.no_grad()
    def _solve(self, y: Tensor, u: Tensor, ut: Tensor, rd: Tensor, rtd: Tensor,
               b: Tensor) -> Tensor:
        """Back-substitution of ``w + R tanh(R~ w + b) = y``, one monotone scalar root a row."""
        tol = SYLVESTER_TOLERANCE.get(y.dtype, 1e-6)
        n, m = y.shape
        rd, rtd, b = (t.expand(n, m) for t in (rd, rtd, b))
        w = torch.zeros_like(y)
        h = torch.zeros_like(y)
        for i in range(m - 1, -1, -1):
            check_deadline("sylvester: inverse")
            s = y[:, i] - h[:, i + 1:] @ u[i, i + 1:]
            c = w[:, i + 1:] @ ut[i, i + 1:] + b[:, i]
            r, rt = rd[:, i], rtd[:, i]
            spread = r.abs()
            lo, hi, wi = s - spread, s + spread, s.clone()
            for _ in range(_MAX_ITERATIONS):
                t = torch.tanh(rt * wi + c)
                f = wi + r * t - s
                if bool((f.abs() <= tol * (1.0 + s.abs())).all()):
                    break
                hi = torch.where(f > 0, wi, hi)
                lo = torch.where(f > 0, lo, wi)
                step = wi - f / (1.0 + r * rt * (1.0 - t * t))
                wi = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
            else:
                if not torch.isfinite(f).all():
                    raise ConvergenceError("sylvester: inverse met non-finite values")
                raise ConvergenceError(f"sylvester: root solve did not converge in "
                                       f"{_MAX_ITERATIONS} iterations (residual "
                                       f"{float(f.abs().max()):.3g})")
            w[:, i] = wi
            h[:, i] = torch.tanh(rt * wi + c)
        return w

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q = self._q()
        u, ut, rd, rtd, b = self._params(context)
        y = x @ q
        w = self._solve(y.detach(), u.detach(), ut.detach(), rd.detach(), rtd.detach(), b.detach())
        a = w @ ut.T + rtd * w + b
        if torch.is_grad_enabled() and (y.requires_grad or a.requires_grad):
            # One differentiable Newton step on the whole system: same value, implicit gradients.
            h = torch.tanh(a)
            residual = w + h @ u.T + rd * h - y
            m = self.rank
            eye = torch.eye(m, dtype=x.dtype, device=x.device)
            # dF/dw = I + R diag(h') R~, upper triangular: (N, M, M).
            r_full = u + torch.diag_embed(rd.expand(x.shape[0], m))
            rt_full = ut + torch.diag_embed(rtd.expand(x.shape[0], m))
            jac = eye + r_full * (1.0 - h * h)[:, None, :] @ rt_full
            w = w - torch.linalg.solve_triangular(jac, residual[..., None], upper=True)[..., 0]
            a = w @ ut.T + rtd * w + b
        h = torch.tanh(a)
        z = x - y @ q.T + w @ q.T
        return z, -torch.log1p((1.0 - h * h) * rd * rtd).sum(-1)

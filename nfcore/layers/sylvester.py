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
``R~`` (``amortize="diagonals"``); with ``amortize="all"`` it shifts every parameter, the whole
of ``R`` and ``R~`` and ``Q``'s free matrix or reflection vectors too, so that each context row
has its own flow, as in the paper's VAE experiments, where the encoder outputs all of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConvergenceError
from ..limits import check_deadline
from .base import MLP, Layer, zero_output

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
        hidden, activation: the context network (with ``context_dim > 0`` only); ``[]`` makes
            it a linear map of the context.
        context_dim: size of the optional context vector.
        amortize: what the context network shifts: ``diagonals`` (``b`` and the diagonals of
            ``R`` and ``R~``) or ``all`` (every parameter, ``Q`` included).

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
                 activation: str = "relu", context_dim: int = 0, amortize: str = "diagonals",
                 **_):
        super().__init__()
        self.kind = kind
        m = dim if kind == "householder" else (rank or dim)
        self.rank = m
        if kind == "householder":
            self.vectors = nn.Parameter(torch.randn(reflections or dim, dim))
        else:
            self.q = nn.Parameter(torch.randn(dim, m))
        #: Whether the context shifts every parameter (per-row Q, R, R~), not just the diagonals.
        self.amortize_all = bool(context_dim) and amortize == "all"
        self._upper = torch.triu_indices(m, m, offset=1)  # the strict upper triangle's entries
        bound = 1.0 / math.sqrt(m)
        self.r_upper = nn.Parameter(torch.empty(m, m).uniform_(-bound, bound) * 0.1)
        self.rt_upper = nn.Parameter(torch.empty(m, m).uniform_(-bound, bound) * 0.1)
        # Near the identity: R's diagonal starts small, R~'s does not, so both get gradients.
        self.r_diag = nn.Parameter(torch.empty(m).uniform_(-0.1, 0.1))
        self.rt_diag = nn.Parameter(torch.empty(m).uniform_(0.5, 1.0))
        self.b = nn.Parameter(torch.zeros(m))
        self.context = None
        if context_dim:
            outputs = 3 * m
            if self.amortize_all:
                q_size = self.vectors.numel() if kind == "householder" else self.q.numel()
                outputs += q_size + 2 * self._upper.shape[1]
            self.context = MLP(context_dim, outputs,
                               [64, 64] if hidden is None else list(hidden), activation)
            with torch.no_grad():  # a small start: the context shifts, it does not dominate
                self.context[-1].weight.mul_(0.1)
                self.context[-1].bias.zero_()

    def reset_identity(self) -> bool:
        """``R = 0`` (its diagonal's free parameter too, ``tanh(0) = 0``) and a zeroed output
        layer of the context network: ``x = z`` for every context. ``R~``, ``Q`` and ``b`` keep
        their values, so the first steps' gradients (through ``R``) are not zero."""
        with torch.no_grad():
            self.r_upper.zero_()
            self.r_diag.zero_()
        if self.context is not None:
            zero_output(self.context)
        return True

    # ------------------------------------------------------------------ parameters
    def _q(self, raw: Tensor | None = None) -> Tensor:
        """Q from its free parameter, or from ``raw``: per-row free parameters, shape
        ``(N, *parameter shape)``, giving per-row Qs ``(N, dim, M)``."""
        if self.kind == "householder":
            v = self.vectors if raw is None else raw
            q = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device).expand(
                *v.shape[:-2], v.shape[-1], v.shape[-1])
            for k in range(v.shape[-2]):
                vk = v[..., k, :]
                scale = 2.0 / (vk * vk).sum(-1, keepdim=True).clamp(min=1e-12)
                q = q - (scale * (q @ vk[..., None])[..., 0])[..., :, None] * vk[..., None, :]
            return q
        q, r = torch.linalg.qr(self.q if raw is None else raw)
        # The sign convention makes Q a smooth function of the parameter.
        sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
        return q * sign[..., None, :]

    def _params(self, context: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Q, the strict upper parts of R and R~, their diagonals and the shift b. Q, R and R~
        are shared, ``(dim, M)`` and ``(M, M)``, or with ``amortize="all"`` per row, ``(N, dim,
        M)`` and ``(N, M, M)``; the diagonals and b are ``(1, M)`` or ``(N, M)``."""
        r_raw, rt_raw, b = self.r_diag[None], self.rt_diag[None], self.b[None]
        u, ut = self.r_upper.triu(1), self.rt_upper.triu(1)
        if self.context is None:
            return self._q(), u, ut, torch.tanh(r_raw), torch.tanh(rt_raw), b
        out = self.context(context)
        m = self.rank
        dr, drt, db = out[:, :m], out[:, m:2 * m], out[:, 2 * m:3 * m]
        r_raw, rt_raw, b = r_raw + dr, rt_raw + drt, b + db
        if not self.amortize_all:
            return self._q(), u, ut, torch.tanh(r_raw), torch.tanh(rt_raw), b
        base = self.vectors if self.kind == "householder" else self.q
        n, pairs = out.shape[0], self._upper.shape[1]
        rest = out[:, 3 * m:]
        q_raw = base + rest[:, :base.numel()].reshape(n, *base.shape)
        where = (torch.arange(n, device=out.device)[:, None], *self._upper.to(out.device))
        du = rest[:, base.numel():base.numel() + pairs]
        dut = rest[:, base.numel() + pairs:]
        u = u.expand(n, m, m).index_put(where, du, accumulate=True)
        ut = ut.expand(n, m, m).index_put(where, dut, accumulate=True)
        return self._q(q_raw), u, ut, torch.tanh(r_raw), torch.tanh(rt_raw), b

    # ------------------------------------------------------------------ directions
    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q, u, ut, rd, rtd, b = self._params(context)
        w = _times(z, q)
        a = _times(w, ut.mT) + rtd * w + b
        h = torch.tanh(a)
        x = z + _times(_times(h, u.mT) + rd * h, q.mT)
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
            # Row i of R and R~ right of the diagonal, shared (M - i - 1) or per row (N, ...).
            s = y[:, i] - (h[:, i + 1:] * u[..., i, i + 1:]).sum(-1)
            c = (w[:, i + 1:] * ut[..., i, i + 1:]).sum(-1) + b[:, i]
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
        q, u, ut, rd, rtd, b = self._params(context)
        y = _times(x, q)
        w = self._solve(y.detach(), u.detach(), ut.detach(), rd.detach(), rtd.detach(), b.detach())
        a = _times(w, ut.mT) + rtd * w + b
        if torch.is_grad_enabled() and (y.requires_grad or a.requires_grad):
            # One differentiable Newton step on the whole system: same value, implicit gradients.
            h = torch.tanh(a)
            residual = w + _times(h, u.mT) + rd * h - y
            m = self.rank
            eye = torch.eye(m, dtype=x.dtype, device=x.device)
            # dF/dw = I + R diag(h') R~, upper triangular: (N, M, M).
            r_full = u + torch.diag_embed(rd.expand(x.shape[0], m))
            rt_full = ut + torch.diag_embed(rtd.expand(x.shape[0], m))
            jac = eye + r_full * (1.0 - h * h)[:, None, :] @ rt_full
            w = w - torch.linalg.solve_triangular(jac, residual[..., None], upper=True)[..., 0]
            a = _times(w, ut.mT) + rtd * w + b
        h = torch.tanh(a)
        z = x - _times(y, q.mT) + _times(w, q.mT)
        return z, -torch.log1p((1.0 - h * h) * rd * rtd).sum(-1)


def _times(v: Tensor, m: Tensor) -> Tensor:
    """Rows of ``v`` (N, K) times ``m``: one shared matrix (K, J), or one per row (N, K, J)."""
    return v @ m if m.dim() == 2 else (v[:, None, :] @ m)[:, 0]

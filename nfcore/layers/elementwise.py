"""Element-wise bijections whose parameters come from a conditioner: affine and rational-quadratic.

Each maps ``(v, params)`` with ``v`` of shape ``(N, F)`` and ``params`` of shape ``(N, F, P)`` to the
transformed values and the element-wise ``log|dy/dv|``. ``inverse=False`` is the normalizing
direction (x -> z).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import lean, soft_clamp

__all__ = ["Affine", "RationalQuadratic"]


def running_sum(t: Tensor, by_adds: bool | None = None) -> Tensor:
    """``t.cumsum(-1)`` over a short last axis (a spline's bins). Off the CPU (``by_adds`` None:
    decided by ``t``'s device) it is ``bins - 1`` in-place adds of one column into the next: on
    an H200 (torch 2.11) the scan kernel over an innermost axis of 8 took 4.6 ms for
    400,000 x 2 x 8 elements, 85 % of an nsf ``log_prob`` pass. The adds accumulate in ``t``'s
    dtype, as CUDA's scan does (the CPU's scan accumulates float32 in double, so the CPU keeps
    it); not a matmul with a triangle of ones, which TF32 would round. Autograd goes through
    either."""
    if by_adds is None:
        by_adds = t.device.type != "cpu"
    if not by_adds:
        return t.cumsum(-1)
    out = t.clone()
    for j in range(1, t.shape[-1]):
        out[..., j] += out[..., j - 1]
    return out


class Affine:
    """``z = (x - shift) * exp(-log_scale)`` with ``log_scale`` softly bounded by ``scale_bound``."""

    def __init__(self, scale_bound: float):
        self.scale_bound = scale_bound
        self.params = 2

    def __call__(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        shift, raw = params.unbind(-1)
        if lean():  # the same to float rounding, in place, a multiply for each divide
            bound = self.scale_bound
            log_scale = raw.mul(1.0 / bound).tanh_().mul_(bound)
            if inverse:
                return torch.addcmul(shift, v, torch.exp(log_scale)), log_scale
            neg = log_scale.neg_()
            return (v - shift).mul_(torch.exp(neg)), neg
        log_scale = soft_clamp(raw, self.scale_bound)
        if inverse:
            return v * torch.exp(log_scale) + shift, log_scale
        return (v - shift) * torch.exp(-log_scale), -log_scale


class RationalQuadratic:
    """Monotone rational-quadratic spline on ``[-bound, bound]``, the identity outside (Durkan 2019).

    The ``3 * bins - 1`` parameters per element are the unnormalized bin widths, bin heights and the
    derivatives at the ``bins - 1`` inner knots. The derivative at both ends is 1, so the spline joins
    the identity tails smoothly.
    """

    min_width = 1e-3
    min_height = 1e-3
    min_derivative = 1e-3
    #: ``min_derivative + softplus(0 + shift) == 1``: zero parameters give unit inner-knot slopes,
    #: and with even bins the identity. (It was ``log(e - 1)``, which left the slopes at 1.001.)
    derivative_shift = math.log(math.expm1(1.0 - min_derivative))

    def __init__(self, bins: int, bound: float):
        self.bins = bins
        self.bound = bound
        self.params = 3 * bins - 1

    def outside(self, v: Tensor) -> Tensor:
        """Rows of ``v`` (shape ``(N, F)``) with an element where the spline is the identity."""
        return (v.abs() > self.bound).any(-1)

    @staticmethod
    def _bins(raw: Tensor, minimum: float) -> tuple[Tensor, Tensor, Tensor]:
        """Bin sizes as fractions of the interval (each >= ``minimum``, summing to 1), their
        cumulative sums (right edges) and left edges. The softmax is written out (torch's kernel
        is ~3x slower over an axis this short); logits are clamped to +-40, where a bin's share is
        already at its floor or ceiling in float32, so ``exp`` cannot overflow."""
        e = torch.exp(raw.clamp(-40.0, 40.0))
        scale = (1.0 - minimum * raw.shape[-1]) / e.sum(-1, keepdim=True)
        size = torch.addcmul(torch.full_like(scale, minimum), e, scale)
        right = running_sum(size)
        return size, right, right - size

    def marginal_params(self, v: Tensor, offset: Tensor | None = None,
                        mixes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0)) -> Tensor:
        """Raw parameters, shape ``(F, 3 * bins - 1)``, of one spline per column of ``v`` (shape
        ``(N, F)``) that maps the column's values towards a standard normal: a data-dependent
        initialization for splines, as ActNorm's is for affine maps. ``offset`` (shape
        ``(N, F, P)``, default zero) is what a conditioner adds to these parameters for each row.

        The inner knots' outputs stay evenly spread over ``[-bound, bound]``; each knot's input is the
        quantile, at the standard normal's probability of that output, of the column's empirical
        distribution with a fraction ``mix`` of a standard normal mixed in, so that a gap between
        modes or a tail with few points still gets bins of a sane width. The derivative at an inner
        knot is the harmonic mean of the slopes of the bins on either side (Fritsch & Butland 1984),
        which keeps it between them. ``mix = 1`` gives the identity. For each column, the mix among
        ``mixes`` under which the column is likeliest (its log-density through the spline, offset
        included, under a standard normal) wins, so that with a zero offset the marginal is never
        fitted worse than by the identity.
        """
        x = v.detach().to(torch.float64)
        candidates = self._knots(x, torch.tensor(mixes, dtype=torch.float64, device=x.device))
        stride = max(1, x.shape[0] // 20_000)  # scoring a subset is plenty and bounds the cost
        rows = x[::stride]
        extra = (torch.zeros_like(candidates[0]).expand(rows.shape[0], -1, -1) if offset is None
                 else offset.detach()[::stride].to(torch.float64))
        scores = []
        for raw in candidates:
            z, ladj = self(rows, raw + extra, inverse=False)
            scores.append((ladj - 0.5 * z * z).mean(0))
        best = torch.stack(scores).argmax(0)  # (F,)
        return candidates[best, torch.arange(x.shape[1], device=x.device)]

    def _knots(self, x: Tensor, mixes: Tensor) -> Tensor:
        """``marginal_params``' candidates, shape ``(M, F, P)``, one per mix; ``x`` is float64."""
        k, bound = self.bins, self.bound
        (n, f), m = x.shape, mixes.shape[0]
        y = torch.linspace(-bound, bound, k + 1, dtype=torch.float64, device=x.device)[1:-1]
        target = torch.special.ndtr(y).expand(f, m, k - 1)
        mix = mixes[:, None]
        columns = x.T.sort(dim=-1).values.contiguous()  # (F, N)
        lo = torch.full_like(target, -bound)
        hi = torch.full_like(target, bound)
        for _ in range(50):  # bisection on the smoothed CDF: 2 bound / 2**50 is below float64's eps
            mid = (lo + hi) / 2
            empirical = torch.searchsorted(columns, mid.flatten(1), right=True).view_as(mid)
            empirical = empirical.to(torch.float64) / n
            below = (1.0 - mix) * empirical + mix * torch.special.ndtr(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        inner = ((lo + hi) / 2).transpose(0, 1)  # (M, F, K - 1)
        end = torch.full_like(inner[..., :1], bound)
        edges = torch.cat([-end, inner, end], dim=-1)
        widths = (edges.diff(dim=-1) / (2.0 * bound)).clamp(min=3.0 * self.min_width)
        widths = widths / widths.sum(-1, keepdim=True)
        slopes = 1.0 / (k * widths)
        knot_slopes = 2.0 * slopes[..., :-1] * slopes[..., 1:] / (slopes[..., :-1] + slopes[..., 1:])
        raw_w = torch.log(widths - self.min_width)  # inverts ``_bins`` (softmax up to a constant)
        raw_h = torch.zeros_like(widths)  # even heights
        raw_d = torch.log(torch.expm1((knot_slopes - self.min_derivative).clamp(min=1e-6)))
        return torch.cat([raw_w, raw_h, raw_d - self.derivative_shift], dim=-1)

    def __call__(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if lean():
            return self._lean(v, params, inverse)
        k, bound = self.bins, self.bound
        raw_w, raw_h, raw_d = params.split([k, k, k - 1], dim=-1)
        w, right_x, left_x = self._bins(raw_w, self.min_width)
        h, right_y, left_y = self._bins(raw_h, self.min_height)
        d = self.min_derivative + F.softplus(raw_d + self.derivative_shift)  # inner knots only

        # Work in unit coordinates u = (v + bound) / (2 bound); the spline maps [0, 1] to [0, 1].
        inside = (v >= -bound) & (v <= bound)
        u = ((v.clamp(-bound, bound) + bound) / (2.0 * bound)).unsqueeze(-1)
        idx = torch.searchsorted(right_y if inverse else right_x, u, right=True).clamp_(max=k - 1)
        xk, wk = left_x.gather(-1, idx).squeeze(-1), w.gather(-1, idx).squeeze(-1)
        yk, hk = left_y.gather(-1, idx).squeeze(-1), h.gather(-1, idx).squeeze(-1)
        # Derivatives at the bin's two knots; both end knots have derivative 1 (identity tails).
        dk = d.gather(-1, (idx - 1).clamp_(min=0)).squeeze(-1)
        dk1 = d.gather(-1, idx.clamp(max=k - 2)).squeeze(-1)
        idx = idx.squeeze(-1)
        one = torch.ones_like(dk)
        dk = torch.where(idx == 0, one, dk)
        dk1 = torch.where(idx == k - 1, one, dk1)
        u = u.squeeze(-1)
        return _in_bin(u, v, inside, xk, yk, wk, hk, dk, dk1, bound, inverse)

    def _lean(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """``__call__`` without autograd, the same values to float rounding in fewer passes:
        widths and heights normalized together in place, the bin found by counting the knots
        below (no ``searchsorted``), one gather for both knots' positions and one for both bin
        sizes, and ``softplus`` of the two derivatives that the bin uses only."""
        k, bound = self.bins, self.bound
        n, f = v.shape
        minimum = self.min_width
        assert self.min_height == minimum  # one normalization for widths and heights
        size = params[..., : 2 * k].clamp(-40.0, 40.0).exp_().view(n, f, 2, k)
        scale = (1.0 - minimum * k) / size.sum(-1, keepdim=True)
        size = size.mul_(scale).add_(minimum)  # (N, F, 2, K): bin widths, bin heights
        right = running_sum(size)

        inside = (v >= -bound) & (v <= bound)
        u = (v.clamp(-bound, bound) + bound) / (2.0 * bound)
        # searchsorted(right, u, right=True).clamp(max=k-1): the knots at or below u.
        idx = (right[..., 1 if inverse else 0, : k - 1] <= u.unsqueeze(-1)).sum(-1, keepdim=True)
        both = idx.unsqueeze(-2).expand(n, f, 2, 1)
        r = right.gather(-1, both).squeeze(-1)
        wh = size.gather(-1, both).squeeze(-1)
        lo = r - wh
        wk, hk = wh.unbind(-1)
        xk, yk = lo.unbind(-1)
        knots = torch.cat([idx - 1, idx], dim=-1).clamp_(0, k - 2)
        d = F.softplus(params[..., 2 * k :].gather(-1, knots).add_(self.derivative_shift))
        d = d.add_(self.min_derivative)
        idx = idx.squeeze(-1)
        one = torch.ones_like(u)
        dk = torch.where(idx == 0, one, d[..., 0])
        dk1 = torch.where(idx == k - 1, one, d[..., 1])
        return _in_bin(u, v, inside, xk, yk, wk, hk, dk, dk1, bound, inverse)

    @property
    def planar_layout(self) -> tuple[tuple[int, ...], tuple[int, int]]:
        """The parameter order and the padding planes that ``planar`` takes (see ``MADE.planes``):
        row ``r`` of ``bins + 1`` rows of 3 planes holds the width and height of bin ``r - 1`` and
        the raw derivative at inner knot ``r``; row 0 and the last row's derivative are padding."""
        k = self.bins
        order = []
        for r in range(1, k + 1):
            order += [r - 1, k + r - 1] + ([2 * k + r - 1] if r < k else [])
        return tuple(order), (3, 1)

    def planar(self, v: Tensor, planes: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """``_lean`` on parameter planes: ``planes`` of shape ``(G, 3 * (bins + 1), M // G)``,
        contiguous, ``G`` groups of elements laid out as ``planar_layout`` says (``MADE.planes``
        gives that), which it overwrites, and ``v`` of shape ``(M,)``, the elements in the same
        order. Every operation is then a pass over whole contiguous planes, where on ``(N, F, P)``
        a sum, a cumulative sum or a comparison over the short last axis runs several times
        slower per element. Widths and heights stay unnormalized: their cumulative sums are
        ``bins - 1`` in-place adds (row 0 is zero), the search compares normalized inner edges,
        and one gather takes, for each element, both edges of its bin in x and y and the raw
        derivatives at both knots; only those are normalized. The same values as ``_lean`` to
        float rounding."""
        k, bound = self.bins, self.bound
        minimum = self.min_width
        assert self.min_height == minimum  # one normalization for widths and heights
        g, m = planes.shape[0], planes.shape[-1]
        rows = planes.view(g, k + 1, 3, m)
        v = v.view(g, m)
        rows[:, 0].zero_()  # the edge before bin 0, and knot 0's derivative (replaced below)
        rows[:, k, 2].zero_()  # knot k's derivative (replaced below)
        cum = rows[:, 1:, :2].clamp_(-40.0, 40.0).exp_()  # (G, K, 2, M): widths, heights
        for j in range(1, k):
            cum[:, j].add_(cum[:, j - 1])
        # Knot positions in the coordinates v + bound (in [0, 2 bound]), not in [0, 1]: the
        # interval's width rides in ``scale`` and ``floor``, and no pass rescales u or the output.
        width = 2.0 * bound
        scale = cum[:, k - 1].reciprocal().mul_((1.0 - minimum * k) * width)  # (G, 2, M): x, y
        floor = minimum * width  # a bin's least width (and height) in these coordinates

        outside = v.abs() > bound
        u = v.clamp(-bound, bound).add_(bound)
        # searchsorted(right, u, right=True).clamp(max=k-1): the inner right edges at or below u.
        s = 1 if inverse else 0
        steps = torch.arange(1, k, dtype=v.dtype, device=v.device).mul_(floor)[:, None]
        edges = torch.addcmul(steps, cum[:, : k - 1, s], scale[:, None, s])  # (G, K - 1, M)
        count = torch.le(edges, u[:, None], out=edges).sum(1)  # (G, M), float
        both = torch.empty((g, 2, 1, m), dtype=torch.long, device=v.device)
        idx = both[:, 0, 0]
        idx.copy_(count)
        torch.add(idx, 1, out=both[:, 1, 0])
        at = rows.gather(1, both.expand(g, 2, 3, m))  # (G, 2, 3, M): the bin's two rows
        # Both end knots have derivative 1 (the identity tails): 1.0 where the bin is the first
        # (left knot) or the last (right knot), as float masks and one lerp (a weight of exactly
        # 0 or 1 gives the start or the end exactly), which is several times faster here than
        # an integer comparison and a masked fill.
        ends = torch.empty_like(at[:, :, 2])  # (G, 2, M)
        torch.le(count, 0.0, out=ends[:, 0])
        torch.ge(count, k - 1.0, out=ends[:, 1])
        lo = torch.addcmul(count.mul_(floor)[:, None], at[:, 0, :2], scale)  # (G, 2, M)
        size = (at[:, 1, :2] - at[:, 0, :2]).mul_(scale).add_(floor)  # (G, 2, M)
        d = F.softplus(at[:, :, 2].add_(self.derivative_shift)).add_(self.min_derivative)
        d = torch.lerp(d, torch.ones((), dtype=d.dtype, device=d.device), ends)
        xk, yk = lo.unbind(1)
        wk, hk = size.unbind(1)
        out, ladj = _in_bin_lean(u, v, outside, xk, yk, wk, hk, d[:, 0], d[:, 1], bound, inverse)
        return out.view(-1), ladj.view(-1)


def _in_bin_lean(u: Tensor, v: Tensor, outside: Tensor, xk: Tensor, yk: Tensor, wk: Tensor,
                 hk: Tensor, dk: Tensor, dk1: Tensor, bound: float, inverse: bool
                 ) -> tuple[Tensor, Tensor]:
    """``_in_bin`` in fewer passes, partly in place (``u``, a temporary of the caller's, is
    overwritten), the same formulas to float rounding. The
    positions ``u``, ``xk``, ``yk``, ``wk`` and ``hk`` are in the coordinates ``v + bound`` (the
    formulas for ``xi``, the slopes and the log-derivative do not depend on the scale)."""
    s = hk / wk
    t = torch.add(dk, dk1).sub_(s, alpha=2.0)
    if inverse:
        dy = u.sub_(yk)
        a = torch.addcmul(hk * (s - dk), dy, t)
        b = torch.addcmul(hk * dk, dy, t, value=-1.0)
        c = s.neg() * dy
        disc = torch.addcmul(b * b, a, c, value=-4.0).clamp_(min=0.0)
        xi = c.mul_(2.0).div_(disc.sqrt_().add_(b).neg_()).clamp_(0.0, 1.0)
        out = torch.addcmul(xk, xi, wk)
    else:
        xi = u.sub_(xk).div_(wk).clamp_(0.0, 1.0)
    om = 1.0 - xi
    xi1 = xi * om
    den = torch.addcmul(s, t, xi1)
    dom = dk * om
    if not inverse:
        # yk + hk (s xi^2 + dk xi (1 - xi)) / den
        out = torch.addcmul(dom, s, xi).mul_(xi).mul_(hk).div_(den).add_(yk)
    # num = dk1 xi^2 + 2 s xi (1 - xi) + dk (1 - xi)^2; log(s^2 num / den^2), one logarithm
    num = torch.addcmul(dk1 * xi, s, om, value=2.0).mul_(xi).addcmul_(dom, om)
    ratio = s.div_(den)
    ladj = ratio.mul_(ratio).mul_(num).log_()
    if inverse:
        ladj = ladj.neg_()
    out = torch.where(outside, v, out.sub_(bound))
    return out, ladj.masked_fill_(outside, 0.0)


def _in_bin(u: Tensor, v: Tensor, inside: Tensor, xk: Tensor, yk: Tensor, wk: Tensor, hk: Tensor,
            dk: Tensor, dk1: Tensor, bound: float, inverse: bool) -> tuple[Tensor, Tensor]:
    """The rational-quadratic map inside one bin (Durkan et al. 2019, eqs. 4-6 and the inverse's
    quadratic root), given ``u`` rescaled to [0, 1], the bin's left knot ``(xk, yk)``, its width
    and height and the derivatives at its two knots; the identity outside ``[-bound, bound]``."""
    s = hk / wk
    t = dk1 + dk - 2.0 * s
    if inverse:
        dy = u - yk
        a = hk * (s - dk) + dy * t
        b = hk * dk - dy * t
        c = -s * dy
        disc = (b * b - 4.0 * a * c).clamp(min=0.0)
        xi = ((2.0 * c) / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
        out = xi * wk + xk
    else:
        xi = ((u - xk) / wk).clamp(0.0, 1.0)
    xi1 = xi * (1.0 - xi)
    den = s + t * xi1
    xi2 = xi * xi
    if not inverse:
        out = yk + hk * (s * xi2 + dk * xi1) / den
    num = dk1 * xi2 + 2.0 * s * xi1 + dk * (1.0 - xi) ** 2
    # log(s^2 num / den^2) = 2 log s + log num - 2 log den, with one logarithm instead of three
    # (s, num and den are bounded away from 0 and infinity by the minimum widths and slopes).
    ladj = torch.log(num * (s / den) ** 2)
    if inverse:
        ladj = -ladj
    out = out * (2.0 * bound) - bound
    out = torch.where(inside, out, v)
    ladj = torch.where(inside, ladj, 0.0)
    return out, ladj

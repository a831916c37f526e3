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

from .base import soft_clamp

__all__ = ["Affine", "RationalQuadratic"]


class Affine:
    """``z = (x - shift) * exp(-log_scale)`` with ``log_scale`` softly bounded by ``scale_bound``."""

    def __init__(self, scale_bound: float):
        self.scale_bound = scale_bound
        self.params = 2

    def __call__(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        shift, raw = params.unbind(-1)
        log_scale = soft_clamp(raw, self.scale_bound)
        if inverse:
            return v * torch.exp(log_scale) + shift, log_scale
        return (v - shift) * torch.exp(-log_scale), -log_scale


_DERIVATIVE_SHIFT = math.log(math.e - 1.0)  # softplus(0 + shift) == 1: zero params give the identity


class RationalQuadratic:
    """Monotone rational-quadratic spline on ``[-bound, bound]``, the identity outside (Durkan 2019).

    The ``3 * bins - 1`` parameters per element are the unnormalized bin widths, bin heights and the
    derivatives at the ``bins - 1`` inner knots. The derivative at both ends is 1, so the spline joins
    the identity tails smoothly.
    """

    min_width = 1e-3
    min_height = 1e-3
    min_derivative = 1e-3

    def __init__(self, bins: int, bound: float):
        self.bins = bins
        self.bound = bound
        self.params = 3 * bins - 1

    def _knots(self, raw: Tensor, minimum: float) -> tuple[Tensor, Tensor]:
        k = self.bins
        w = minimum + (1.0 - minimum * k) * torch.softmax(raw, dim=-1)
        cum = F.pad(torch.cumsum(w, dim=-1), (1, 0))
        cum = 2.0 * self.bound * cum[..., 1:-1] - self.bound
        ends = torch.full_like(raw[..., :1], self.bound)
        cum = torch.cat([-ends, cum, ends], dim=-1)
        return cum, cum[..., 1:] - cum[..., :-1]

    def __call__(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k, bound = self.bins, self.bound
        raw_w, raw_h, raw_d = params.split([k, k, k - 1], dim=-1)
        cumx, widths = self._knots(raw_w, self.min_width)
        cumy, heights = self._knots(raw_h, self.min_height)
        d = self.min_derivative + F.softplus(raw_d + _DERIVATIVE_SHIFT)
        d = F.pad(d, (1, 1), value=1.0)

        inside = (v >= -bound) & (v <= bound)
        vc = v.clamp(-bound, bound).unsqueeze(-1)
        knots = cumy if inverse else cumx
        idx = torch.searchsorted(knots.contiguous(), vc.contiguous(), right=True) - 1
        idx = idx.clamp(0, k - 1)

        xk = cumx.gather(-1, idx).squeeze(-1)
        yk = cumy.gather(-1, idx).squeeze(-1)
        wk = widths.gather(-1, idx).squeeze(-1)
        hk = heights.gather(-1, idx).squeeze(-1)
        dk = d.gather(-1, idx).squeeze(-1)
        dk1 = d.gather(-1, idx + 1).squeeze(-1)
        vc = vc.squeeze(-1)
        s = hk / wk

        if inverse:
            dy = vc - yk
            t = dk1 + dk - 2.0 * s
            a = hk * (s - dk) + dy * t
            b = hk * dk - dy * t
            c = -s * dy
            disc = (b * b - 4.0 * a * c).clamp(min=0.0)
            xi = (2.0 * c) / (-b - torch.sqrt(disc))
            xi = xi.clamp(0.0, 1.0)
            out = xi * wk + xk
        else:
            xi = (vc - xk) / wk
            xi1 = xi * (1.0 - xi)
            out = yk + hk * (s * xi * xi + dk * xi1) / (s + (dk1 + dk - 2.0 * s) * xi1)

        xi1 = xi * (1.0 - xi)
        den = s + (dk1 + dk - 2.0 * s) * xi1
        num = dk1 * xi * xi + 2.0 * s * xi1 + dk * (1.0 - xi) ** 2
        ladj = 2.0 * torch.log(s) + torch.log(num) - 2.0 * torch.log(den)
        if inverse:
            ladj = -ladj
        out = torch.where(inside, out, v)
        ladj = torch.where(inside, ladj, torch.zeros_like(ladj))
        return out, ladj

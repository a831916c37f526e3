"""A data-side layer for heavy tails: ``asinh``, which a flow with a Gaussian base cannot follow
on its own (a Lipschitz map of a Gaussian keeps Gaussian tails)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear import Standardize, scale_floor

__all__ = ["Asinh"]


class Asinh(Standardize):
    """Fixed element-wise ``z = asinh((x - loc) / scale)``: a ``Standardize`` with robust
    statistics, fitted to the training data by ``Flow.initialize`` (``loc`` the median, ``scale``
    the interquartile range over 1.349, a Gaussian's sd, of each column), then ``asinh``; with ``log|dz/dx| = -log(scale) - log(hypot(u, 1))``.

    Near ``loc`` it is the identity in units of ``scale``; beyond a few scales it is a logarithm,
    so power-law tails (Cauchy, Student-t, Pareto) and a log-normal's right tail reach the layers
    behind it as exponential or Gaussian-like ones, which they can shape. A row at 1e4 scales goes
    in at about 10 rather than 1e4. Its inverse ``loc + scale * sinh(z)`` takes ``|z|`` up to
    ``log`` of the dtype's largest value less one (beyond that it would overflow).

    Arguments:
        dim: number of features.

    Example:
        >>> import torch
        >>> from nfcore.layers import Asinh
        >>> layer = Asinh(2).double()
        >>> layer.initialize(torch.distributions.Cauchy(0.0, 1.0).sample((1000, 2)).double())
        >>> x = torch.tensor([[1e4, -3.0]], dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> bool(z.abs().max() < 11)
        True
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        x64 = x.double()
        if x.shape[0] < 2:
            return
        q = torch.quantile(x64, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64,
                                             device=x.device), dim=0)
        spread = (q[2] - q[0]) / 1.349
        # A column with most of its rows on one value has no interquartile range: its sd then,
        # and for a constant column the floor Standardize takes.
        spread = torch.where(spread > 0, spread, x64.std(0))
        self.loc.copy_(q[1])
        self.scale.copy_(torch.maximum(spread, scale_floor(x64, x.dtype)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, ladj = super().forward(x)
        return torch.asinh(u), ladj - torch.log(torch.hypot(u, torch.ones_like(u))).sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top = math.log(torch.finfo(z.dtype).max) - 1.0
        z = z.clamp(-top, top)
        a = z.abs()
        # log cosh z = |z| + log1p(exp(-2|z|)) - log 2, which does not overflow
        log_cosh = a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)
        x, ladj = super().inverse(torch.sinh(z))
        return x, ladj + log_cosh.sum(-1)

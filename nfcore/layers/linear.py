"""Linear and fixed layers: LU-parametrised linear map and ActNorm (Glow), permutations, and the
standardization layer that keeps ``log_prob`` in the data's own units."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Layer

__all__ = ["LULinear", "ActNorm", "Permute", "Standardize"]


class LULinear(Layer):
    """``z = W x + bias`` with ``W = P L U``: ``P`` a fixed permutation, ``L`` unit lower-triangular,
    ``U`` upper-triangular with a positive diagonal ``exp(log_diag)``. ``log|det W| = sum(log_diag)``.

    ``L`` and ``U`` start at the identity, so the layer starts as ``P``: the reverse order or a
    random one. Training can shear and scale through ``L U`` but never swap features (``det(L U)``
    stays positive), so ``P`` settles whether the feature order alternates between the
    autoregressive layers around it. ``reverse`` makes it alternate; in two dimensions a random
    ``P`` leaves the order as it was with probability 1/2.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018).

    Arguments:
        dim: number of features.
        permutation: ``random`` (drawn from torch's global generator) or ``reverse``.

    Example:
        >>> import torch
        >>> from nfcore.layers import LULinear
        >>> layer = LULinear(3).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim: int, *, permutation: str = "random", **_):
        super().__init__()
        perm = torch.arange(dim - 1, -1, -1) if permutation == "reverse" else torch.randperm(dim)
        self.register_buffer("perm", perm)
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("eye", torch.eye(dim))

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower.tril(-1) + self.eye
        upper = self.upper.triu(1) + torch.diag(torch.exp(self.log_diag))
        return lower, upper

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        # x W^T with W = P L U: apply U, then L, then P to the row vectors.
        z = (x @ upper.T @ lower.T)[:, torch.argsort(self.perm)] + self.bias
        return z, self.log_diag.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        y = (z - self.bias)[:, self.perm].T
        y = torch.linalg.solve_triangular(lower, y, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True).T
        return x, (-self.log_diag.sum()).expand(z.shape[0])


class ActNorm(Layer):
    """Per-feature affine map ``z = (x - loc) * exp(-log_scale)``; ``Flow.initialize`` sets it from data
    so the first batch comes out with zero mean and unit variance (Glow's data-dependent init).

    References: Kingma & Dhariwal, "Glow" (2018).

    Arguments:
        dim: number of features.

    Example:
        >>> import torch
        >>> from nfcore.layers import ActNorm
        >>> layer = ActNorm(3).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim: int, **_):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        self.loc.copy_(x.mean(0))
        self.log_scale.copy_(torch.log(x.std(0).clamp(min=1e-6)) if x.shape[0] > 1 else 0.0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x - self.loc) * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(self.log_scale) + self.loc, self.log_scale.sum().expand(z.shape[0])


class Permute(Layer):
    """A fixed permutation of the features: ``reverse``, or ``random`` drawn from ``seed``.

    Arguments:
        dim: number of features.
        kind: ``reverse`` or ``random``; seed: the seed of a random order.

    Example:
        >>> import torch
        >>> from nfcore.layers import Permute
        >>> layer = Permute(3, kind="random", seed=1).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim: int, *, kind: str = "reverse", seed: int = 0, **_):
        super().__init__()
        if kind == "reverse":
            order = torch.arange(dim - 1, -1, -1)
        else:
            order = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.reverse = kind == "reverse"
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x.flip(-1) if self.reverse else x.index_select(-1, self.order)
        return z, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z.flip(-1) if self.reverse else z.index_select(-1, self.inverse_order)
        return x, z.new_zeros(z.shape[0])


class Standardize(Layer):
    """Fixed ``z = (x - loc) / scale``, fitted to the training data by ``Flow.initialize``, so the
    flow behind it sees standardized data while ``log_prob`` stays in data units.

    Arguments:
        dim: number of features.

    Example:
        >>> import torch
        >>> from nfcore.layers import Standardize
        >>> layer = Standardize(3).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim: int, **_):
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        self.loc.copy_(x.mean(0))
        if x.shape[0] > 1:
            self.scale.copy_(x.std(0).clamp(min=1e-6 * (1.0 + x.abs().max().item())))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x - self.loc) / self.scale, (-torch.log(self.scale).sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * self.scale + self.loc, torch.log(self.scale).sum().expand(z.shape[0])

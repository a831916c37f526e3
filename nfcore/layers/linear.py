"""Linear and fixed layers: LU-parametrised linear map and ActNorm (Glow), permutations, and the
standardization layer that keeps ``log_prob`` in the data's own units."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Layer

__all__ = ["LULinear", "ActNorm", "LocScale", "Permute", "Standardize", "scale_floor"]


#: Rows per triangular solve on an accelerator. On an H200 (torch 2.11, CUDA 13), one solve of a
#: 2 x 2 factor against 400,000 right-hand sides took 0.2 ms, against 600,000 5.2 s and against
#: 1,000,000 8.1 s; in blocks of this many rows, 1,000,000 took 0.5 ms. It made every preset's
#: ``log_prob`` (``loc_scale`` solves) 100 to 1000 times slower from about half a million rows.
SOLVE_BLOCK_ROWS = 1 << 16


def solve_rows(factor: Tensor, rows: Tensor, **kw) -> Tensor:
    """``x`` with ``factor @ x[i] = rows[i]`` for every row: ``solve_triangular(factor, rows.T,
    **kw).T``, in blocks of ``SOLVE_BLOCK_ROWS`` rows off the CPU (the same arithmetic per row)."""
    if rows.device.type == "cpu" or rows.shape[0] <= SOLVE_BLOCK_ROWS:
        return torch.linalg.solve_triangular(factor, rows.T, **kw).T
    return torch.cat([torch.linalg.solve_triangular(factor, part.T, **kw).T
                      for part in rows.split(SOLVE_BLOCK_ROWS)])


def scale_floor(x64: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest scale a data-side layer fitted to the columns of ``x64`` may take: ``dtype``'s
    resolution at each column's magnitude, relative, so that data at a scale of 1e-12 keep it (an
    absolute floor of eps squashed them to 1e-6, and a fit of them ended 600 nats a row short).
    An all-zero column gets 1."""
    top = x64.abs().max(0).values
    return torch.where(top > 0, 8.0 * torch.finfo(dtype).eps * top, 1.0)


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
        y = solve_rows(lower, (z - self.bias)[:, self.perm], upper=False, unitriangular=True)
        return solve_rows(upper, y, upper=True), (-self.log_diag.sum()).expand(z.shape[0])


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


class LocScale(Layer):
    """A trainable location-scale layer, ``x = loc + L z``, with ``L`` lower-triangular and a positive
    diagonal (``triangular=False``: diagonal ``L``, as ActNorm). ``log|det dz/dx| = -sum(log diag L)``.

    Placed on the data side of every preset (after ``standardize``), it carries the location, scale
    and correlation of whatever the flow fits, so that the layers behind it, and the splines' fixed
    interval ``[-bound, bound]`` in particular, see roughly standardized, decorrelated values.
    ``Flow.initialize`` sets it from data: ``loc`` the mean and ``L L^T`` the covariance of its input
    (for reverse KL, pseudo-data from a Gaussian approximation of the target, see
    ``nfcore.train.start``). It starts as the identity and stays trainable.

    Arguments:
        dim: number of features.
        triangular: a full lower-triangular ``L`` (O(dim^2) per row) or a diagonal one.

    Example:
        >>> import torch
        >>> from nfcore.layers import LocScale
        >>> layer = LocScale(3).double()
        >>> layer.initialize(torch.randn(100, 3, dtype=torch.float64) @ torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64))
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim: int, *, triangular: bool = True, **_):
        super().__init__()
        self.triangular = triangular
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        if triangular:
            self.lower = nn.Parameter(torch.zeros(dim, dim))

    def _scale(self) -> Tensor:
        return self.lower.tril(-1) + torch.diag(torch.exp(self.log_diag))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        x64 = x.double()  # float64 statistics: a mean of 1e3 with a scale of 1e-3 survives float32
        n = x64.shape[0]
        loc = x64.mean(0)
        if n < 2:
            self.loc.copy_(loc)
            return
        centred = x64 - loc
        cov = centred.T @ centred / (n - 1)
        if not self.triangular:
            self.loc.copy_(loc)
            self.log_diag.copy_(0.5 * torch.log(cov.diag().clamp(min=1e-12)))
            return
        scale = cov.diag().clamp(min=1e-12).sqrt()
        corr = cov / (scale[:, None] * scale[None, :])
        # A singular correlation (collinear columns) gets the least jitter that makes it positive
        # definite, so that L stays invertible; a regular one is factored exactly.
        eye = torch.eye(corr.shape[0], dtype=torch.float64, device=corr.device)
        for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
            chol, info = torch.linalg.cholesky_ex((1.0 - jitter) * corr + jitter * eye)
            if int(info) == 0:
                break
        chol = chol * scale[:, None]
        self.loc.copy_(loc)
        self.log_diag.copy_(torch.log(chol.diag()))
        self.lower.copy_(chol.tril(-1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = (-self.log_diag.sum()).expand(x.shape[0])
        if not self.triangular:
            return (x - self.loc) * torch.exp(-self.log_diag), ladj
        return solve_rows(self._scale(), x - self.loc, upper=False), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = self.log_diag.sum().expand(z.shape[0])
        if not self.triangular:
            return z * torch.exp(self.log_diag) + self.loc, ladj
        return z @ self._scale().T + self.loc, ladj


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
        x64 = x.double()  # float64 statistics: a mean of 1e3 with a scale of 1e-3 survives float32
        self.loc.copy_(x64.mean(0))
        if x.shape[0] > 1:
            self.scale.copy_(torch.maximum(x64.std(0), scale_floor(x64, x.dtype)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x - self.loc) / self.scale, (-torch.log(self.scale).sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * self.scale + self.loc, torch.log(self.scale).sum().expand(z.shape[0])

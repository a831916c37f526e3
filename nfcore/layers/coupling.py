"""Coupling layers: affine (RealNVP, Dinh et al. 2017) and rational-quadratic spline (NSF coupling)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MLP, Layer, spline_start, zero_output
from .elementwise import Affine, RationalQuadratic

__all__ = ["Coupling", "AffineCoupling", "NSFCoupling"]


class Coupling(Layer):
    """Transforms the last ``dim - dim // 2`` features element-wise, with parameters computed from the
    first ``dim // 2`` features and the context. Both directions take one pass.
    """

    def __init__(self, dim: int, elementwise, hidden: list[int], activation: str, context_dim: int):
        super().__init__()
        self.split = dim // 2
        self.elementwise = elementwise
        out = (dim - self.split) * elementwise.params
        self.net = MLP(self.split + context_dim, out, hidden, activation)

    def _params(self, a: Tensor, context: Tensor | None) -> Tensor:
        h = a if context is None else torch.cat([a, context], dim=-1)
        return self.net(h).unflatten(-1, (-1, self.elementwise.params))

    def _transform(self, v: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        a, b = v[..., : self.split], v[..., self.split :]
        b, ladj = self.elementwise(b, self._params(a, context), inverse)
        return torch.cat([a, b], dim=-1), ladj.sum(-1)

    def reset_identity(self) -> bool:
        return zero_output(self.net)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(z, context, inverse=True)


class AffineCoupling(Coupling):
    """Affine coupling: ``z_b = (x_b - t(x_a)) * exp(-s(x_a))``, with ``|s| < scale_bound``.

    References: Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP" (2017).

    Arguments:
        dim: number of features (at least 2).
        hidden, activation: the conditioner MLP.
        scale_bound: bound on |log scale|.
        context_dim: size of the conditioning vector (0: none).

    Example:
        >>> import torch
        >>> from nfcore.layers import AffineCoupling
        >>> layer = AffineCoupling(3, hidden=[8], activation="relu", scale_bound=6.0).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim, *, hidden, activation, scale_bound, context_dim=0):
        super().__init__(dim, Affine(scale_bound), hidden, activation, context_dim)


class NSFCoupling(Coupling):
    """Rational-quadratic spline coupling, the identity outside ``[-bound, bound]``.

    References: Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows" (2019).

    Arguments:
        dim: number of features (at least 2).
        hidden, activation: the conditioner MLP.
        bins: spline bins; bound: half-width of the spline's interval.
        context_dim: size of the conditioning vector (0: none).

    Example:
        >>> import torch
        >>> from nfcore.layers import NSFCoupling
        >>> layer = NSFCoupling(3, hidden=[8], activation="relu", bins=4, bound=3.0).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim, *, hidden, activation, bins, bound, context_dim=0):
        super().__init__(dim, RationalQuadratic(bins, bound), hidden, activation, context_dim)

    def tail_mask(self, x: Tensor) -> Tensor:
        """Rows of the input ``x`` whose transformed features reach the identity tails."""
        return self.elementwise.outside(x[..., self.split :])

    def initialize_knots(self, x: Tensor, context: Tensor | None = None) -> None:
        """Start each transformed feature's spline as the map of its marginal in ``x`` towards a
        standard normal (see ``RationalQuadratic.marginal_params``), the same for every row: the
        conditioner's output weights are zeroed and its output bias holds those knots. Training
        then learns how the splines depend on the other features (see ``spline_start``)."""
        spline_start(self.net, self.elementwise, x[..., self.split :])

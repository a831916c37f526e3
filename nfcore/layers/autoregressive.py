"""Autoregressive layers with a MADE conditioner: MAF, IAF and the autoregressive spline (NSF-AR)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MADE, Layer, lean, spline_start, zero_output
from .elementwise import Affine, RationalQuadratic

__all__ = ["Autoregressive", "MAF", "IAF", "NSFAutoregressive"]


class Autoregressive(Layer):
    """An element-wise bijection whose parameters for feature ``i`` depend on features ``< i``.

    With ``inverse_autoregressive=False`` (MAF) the parameters are functions of the data ``x``: scoring
    is one parallel pass and sampling takes ``dim`` passes. With ``inverse_autoregressive=True`` (IAF)
    they are functions of the latent ``z``: sampling is one pass and scoring takes ``dim`` passes.
    Either way the sequential direction is exact after ``dim`` passes, not an approximation.
    """

    def __init__(self, dim, elementwise, hidden, activation, context_dim, inverse_autoregressive):
        super().__init__()
        self.dim = dim
        self.elementwise = elementwise
        self.inverse_autoregressive = inverse_autoregressive
        self.made = MADE(dim, elementwise.params, hidden, activation, context_dim)
        self.fast_forward = not inverse_autoregressive
        self.fast_inverse = inverse_autoregressive

    def _parallel(self, v: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        planar = getattr(self.elementwise, "planar", None)
        if planar is not None and lean():
            # Lean path: the conditioner's output as contiguous parameter planes (no short last
            # axis for the kernel to reduce over); the elements in feature-major order.
            n, f = v.shape
            order, pad = self.elementwise.planar_layout
            groups = self.made.plane_groups()
            planes, vt = self.made.planes(v, context, order, pad, groups)
            planes = planes.view(groups, planes.shape[1], planes.shape[2] * n)
            out, ladj = planar(vt.reshape(-1), planes, inverse)
            return out.view(f, n).T, ladj.view(f, n).sum(0)
        out, ladj = self.elementwise(v, self.made(v, context), inverse)
        return out, ladj.sum(-1)

    def _sequential(self, v: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        # Pass i computes feature i from the features before it, already final: exact after
        # ``dim`` passes. Columns are collected in a list (no in-place writes, autograd-safe).
        columns: list[Tensor] = []
        ladj = v.new_zeros(v.shape[0])
        out = v[..., :0]
        for i in range(self.dim):
            params = self.made.feature_params(out, context, i)
            col, l = self.elementwise(v[..., i : i + 1], params[:, None, :], inverse)
            columns.append(col)
            ladj = ladj + l[..., 0]
            out = torch.cat(columns, dim=-1)
        return out, ladj

    def reset_identity(self) -> bool:
        return zero_output(self.made.net)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.inverse_autoregressive:
            return self._sequential(x, context, inverse=False)
        return self._parallel(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.inverse_autoregressive:
            return self._parallel(z, context, inverse=True)
        return self._sequential(z, context, inverse=True)


class MAF(Autoregressive):
    """Masked autoregressive flow layer: fast to score.

    References: Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation"
    (2017).

    Arguments:
        dim: number of features.
        hidden, activation: the MADE conditioner.
        scale_bound: bound on |log scale|.
        context_dim: size of the conditioning vector (0: none).

    Example:
        >>> import torch
        >>> from nfcore.layers import MAF
        >>> layer = MAF(3, hidden=[8], activation="relu", scale_bound=6.0).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim, *, hidden, activation, scale_bound, context_dim=0):
        super().__init__(dim, Affine(scale_bound), hidden, activation, context_dim, False)


class IAF(Autoregressive):
    """Inverse autoregressive flow layer: fast to sample.

    References: Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow"
    (2016).

    Arguments:
        dim: number of features.
        hidden, activation: the MADE conditioner.
        scale_bound: bound on |log scale|.
        context_dim: size of the conditioning vector (0: none).

    Example:
        >>> import torch
        >>> from nfcore.layers import IAF
        >>> layer = IAF(3, hidden=[8], activation="relu", scale_bound=6.0).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim, *, hidden, activation, scale_bound, context_dim=0):
        super().__init__(dim, Affine(scale_bound), hidden, activation, context_dim, True)


class NSFAutoregressive(Autoregressive):
    """Autoregressive rational-quadratic spline layer (NSF-AR), the identity outside the bound.

    References: Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows" (2019).

    Arguments:
        dim: number of features.
        hidden, activation: the MADE conditioner.
        bins: spline bins; bound: half-width of the spline's interval.
        context_dim: size of the conditioning vector (0: none).

    Example:
        >>> import torch
        >>> from nfcore.layers import NSFAutoregressive
        >>> layer = NSFAutoregressive(3, hidden=[8], activation="relu", bins=4, bound=3.0).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    def __init__(self, dim, *, hidden, activation, bins, bound, context_dim=0):
        super().__init__(dim, RationalQuadratic(bins, bound), hidden, activation, context_dim, False)

    def tail_mask(self, x: Tensor) -> Tensor:
        """Rows of the input ``x`` with a feature in the identity tails."""
        return self.elementwise.outside(x)

    def initialize_knots(self, x: Tensor, context: Tensor | None = None) -> None:
        """Start each feature's spline as the map of its marginal in ``x`` towards a standard
        normal (see ``RationalQuadratic.marginal_params``), the same for every row: the
        conditioner's output weights are zeroed and its output bias holds those knots. Training
        then learns how the splines depend on the features before them (see ``spline_start``)."""
        spline_start(self.made.net, self.elementwise, x)

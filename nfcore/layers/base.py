"""The layer interface and the conditioner networks shared by the layer families.

Direction convention: ``forward`` maps data ``x`` to latent ``z`` (the normalizing direction) and
returns ``log|det dz/dx|``; ``inverse`` maps ``z`` to ``x`` and returns ``log|det dx/dz|``. A flow's
``log_prob`` therefore only runs ``forward`` and its sampler only runs ``inverse``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Layer", "MLP", "MADE", "ACTIVATIONS", "soft_clamp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """Smoothly squash ``x`` into ``(-bound, bound)``; the identity near 0."""
    return bound * torch.tanh(x / bound)


class Layer(nn.Module):
    """A bijection with a tractable log-Jacobian, optionally conditioned on a context vector."""

    #: True when ``forward`` (x -> z) is computed in one parallel pass.
    fast_forward: bool = True
    #: True when ``inverse`` (z -> x) is computed in one parallel pass.
    fast_inverse: bool = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MLP(nn.Sequential):
    """A plain multi-layer perceptron: ``in_features -> hidden... -> out_features``."""

    def __init__(self, in_features: int, out_features: int, hidden: list[int], activation: str):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE)."""

    def __init__(self, mask: Tensor):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015).

    Maps ``(x, context)`` of shape ``(N, features)`` and ``(N, context)`` to parameters of shape
    ``(N, features, params)`` where the parameters of feature ``i`` depend only on ``x[:, :i]``
    (in the natural order) and on the context.
    """

    def __init__(
        self,
        features: int,
        params: int,
        hidden: list[int],
        activation: str,
        context: int = 0,
    ):
        super().__init__()
        self.features, self.params, self.context = features, params, context
        in_deg = torch.cat([torch.zeros(context, dtype=torch.long), torch.arange(1, features + 1)])
        degrees = [in_deg]
        for h in hidden:
            # Hidden degrees cycle so every unit reaches some output. With a context, degree-0 units
            # see the context alone, which is what the first feature's parameters may depend on.
            if context:
                deg = torch.arange(h) % features
            else:
                deg = torch.arange(h) % max(features - 1, 1) + 1
            degrees.append(deg)
        out_deg = torch.arange(1, features + 1).repeat_interleave(params)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True):
            layers += [MaskedLinear((d_out[:, None] >= d_in[None, :]).float())]
            layers += [ACTIVATIONS[activation]()]
        layers.append(MaskedLinear((out_deg[:, None] > degrees[-1][None, :]).float()))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat([context, x], dim=-1)
        return self.net(x).unflatten(-1, (self.features, self.params))

"""The layer interface and the conditioner networks shared by the layer families.

Direction convention: ``forward`` maps data ``x`` to latent ``z`` (the normalizing direction) and
returns ``log|det dz/dx|``; ``inverse`` maps ``z`` to ``x`` and returns ``log|det dx/dz|``. A flow's
``log_prob`` therefore only runs ``forward`` and its sampler only runs ``inverse``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["Layer", "MLP", "MADE", "ACTIVATIONS", "soft_clamp", "spline_start", "zero_output", "lean",
           "eager_inference"]

_EAGER = contextvars.ContextVar("nfcore_eager_inference", default=False)


def lean() -> bool:
    """True when a layer may take its lean inference kernels: autograd is off (``no_grad`` or
    ``inference_mode``) and no ``eager_inference()`` block is open. Lean kernels compute the same
    values (to float rounding) with fewer, in-place operations and cached derived weights."""
    return not torch.is_grad_enabled() and not _EAGER.get()


@contextlib.contextmanager
def eager_inference() -> Iterator[None]:
    """Run the plain (training-path) kernels even without autograd: the reference that the lean
    inference path is tested against."""
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)

def _relu() -> nn.Module:
    # In place: saves one (batch x width) allocation per hidden layer, and ReLU's backward only
    # needs its output, so autograd stays correct.
    return nn.ReLU(inplace=True)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": _relu,
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
    #: True when ``forward``'s log|det| is exact (to the layer's stated solver tolerance), False
    #: when it is a stochastic estimate.
    exact: bool = True
    #: True when each row's result depends on that row alone (no batch-wide solver stopping
    #: rule), so that a flow may process a large batch in cache-sized row blocks.
    row_wise: bool = True

    @property
    def cost(self) -> tuple[str, str]:
        """What ``forward`` and ``inverse`` cost: ``"one pass"``, ``"iterative"`` (a numerical
        solve or a pass per feature) or ``"ode"`` (an ODE solve)."""
        return ("one pass" if self.fast_forward else "iterative",
                "one pass" if self.fast_inverse else "iterative")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def reset_identity(self) -> bool:
        """Make the layer the identity map, if its family can start as one and keep learning
        (conditioned layers: a zeroed output layer, as Glow's last convolution); returns whether
        it did."""
        return False


def zero_output(net: nn.Sequential) -> bool:
    """Zero a conditioner's output layer: zero raw parameters are the identity for the affine
    (unit scale, zero shift) and the spline (even bins, unit slopes) element-wise maps."""
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    return True


def spline_start(net: nn.Sequential, spline, v: Tensor) -> None:
    """Start a spline layer whose conditioner is ``net`` as ``spline``'s map of each column of ``v``
    (its marginal) towards a standard normal, with no dependence yet on the conditioner's inputs:
    the output weights zeroed, the output bias set by ``spline.marginal_params``.

    Why zeroed weights, not the random ones an MLP starts with: random weights bend each row's
    spline at random away from the marginal fit, which training must undo, and on data close to
    its own Gaussian the fit never quite did (held-out log-likelihood 0.015-0.067 nats a row below
    the data's Gaussian on a 5-D Gaussian and on sbibm's Bernoulli GLM draws, nsf, seeds 0 and
    1). From this start it came within 0.01 of it (5-D Gaussian) or beat it (GLM). Only spline
    layers start so: their bias moves each marginal's shape, so the gradient is not zero there.
    An affine layer started as the identity is at a stationary point on any data whose
    conditional means and scales do not change with the other features (symmetric clusters), and maf and realnvp stalled there (0.05-0.32 nats a
    row lost on three cluster sets), so they keep their random start.
    """
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.copy_(spline.marginal_params(v).reshape(-1))


class Dense(nn.Linear):
    """``nn.Linear`` computed as a matmul then an in-place bias add: on CPU this skips addmm's
    broadcast copy of the bias into the output, about a third of a wide layer's time at large
    batch. Autograd-safe: the matmul's backward does not read its output."""

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight.T).add_(self.bias)


class MLP(nn.Sequential):
    """A plain multi-layer perceptron: ``in_features -> hidden... -> out_features``."""

    def __init__(self, in_features: int, out_features: int, hidden: list[int], activation: str):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [Dense(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(Dense(width, out_features))
        super().__init__(*layers)


class MaskedLinear(Dense):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE)."""

    def __init__(self, mask: Tensor):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def masked_weight(self) -> Tensor:
        """``weight * mask``; without autograd, computed once and kept until either changes (an
        optimizer step or a load bumps the weight's version counter)."""
        if not lean() or self.weight.is_inference() or self.mask.is_inference():
            return self.weight * self.mask  # (inference tensors keep no version counter)
        key = (self.weight._version, self.mask._version, self.weight.data_ptr(),
               self.weight.device, self.weight.dtype)
        cached = self.__dict__.get("_masked")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, (self.weight * self.mask).detach())
            self.__dict__["_masked"] = cached
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.masked_weight().T).add_(self.bias)

    def augmented_weight(self, features: int = 1, order: tuple[int, ...] | None = None,
                         groups: int = 1) -> Tensor:
        """``[bias | weight * mask]``, shape ``(out, 1 + in)``: ``W_aug @ [1; x.T]`` is the
        layer's output transposed, the bias added by the matmul itself (no pass over the output).
        With ``order``, the output rows, ``features`` blocks of ``len(order)`` params, are
        reordered to ``(group, param, feature within the group)``, the params in ``order`` and
        the features in ``groups`` equal, consecutive groups: each parameter of every feature of
        a group comes out as one contiguous row, and a group's rows are one block. Cached like
        ``masked_weight`` (lean path only)."""
        def build() -> Tensor:
            aug = torch.cat([self.bias[:, None], self.masked_weight()], dim=1)
            if order is not None:
                index = torch.tensor(order, device=aug.device)
                aug = aug.unflatten(0, (groups, features // groups, -1))[:, :, index]
                aug = aug.transpose(1, 2).flatten(0, 2)
            return aug.contiguous()

        w, b, mask = self.weight, self.bias, self.mask
        if not lean() or w.is_inference() or b.is_inference() or mask.is_inference():
            return build()
        key = (w._version, w.data_ptr(), b._version, b.data_ptr(), mask._version, w.device,
               w.dtype, features, order, groups)
        cached = self.__dict__.get("_augmented")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, build().detach())
            self.__dict__["_augmented"] = cached
        return cached[1]


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
            # Sorted, so the units that feature i may read form a prefix (see ``feature_params``).
            if context:
                deg = torch.arange(h) % features
            else:
                deg = torch.arange(h) % max(features - 1, 1) + 1
            degrees.append(deg.sort().values)
        out_deg = torch.arange(1, features + 1).repeat_interleave(params)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True):
            layers += [MaskedLinear((d_out[:, None] >= d_in[None, :]).float())]
            layers += [ACTIVATIONS[activation]()]
        layers.append(MaskedLinear((out_deg[:, None] > degrees[-1][None, :]).float()))
        self.net = nn.Sequential(*layers)
        # widths[i][l]: how many units of layer l feature i's parameters can depend on.
        self.widths = [[int((d <= i).sum()) for d in degrees] for i in range(features)]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat([context, x], dim=-1)
        return self.net(x).unflatten(-1, (self.features, self.params))

    def plane_groups(self, limit: int = 5) -> int:
        """How many groups of consecutive features ``planes`` computes apart: the largest divisor
        of ``features`` up to ``limit``. The output layer's mask is block-triangular (hidden
        degrees are sorted): a group's parameters read only a prefix of the last hidden layer's
        units, so one matmul per group skips most of the masked-out weights (5 groups: 40 % of
        the layer's FLOPs at dim 10, 36 % at dim 50)."""
        return max(g for g in range(1, min(limit, self.features) + 1) if self.features % g == 0)

    def planes(self, x: Tensor, context: Tensor | None = None, order: tuple[int, ...] | None = None,
               pad: tuple[int, int] = (0, 0), groups: int = 1) -> tuple[Tensor, Tensor]:
        """``forward`` laid out as parameter planes, and ``x.T`` (contiguous, shape
        ``(features, N)``). The planes have shape ``(groups, pad[0] + params + pad[1],
        features // groups, N)``, contiguous, for ``groups`` equal groups of consecutive features:
        ``planes[g, pad[0] + j, i, n] == forward(x)[n, g * features // groups + i, order[j]]``;
        the ``pad`` planes before and after are left uninitialized, for the caller's use.

        The whole network runs transposed, ``h.T = W_aug @ [1; h_prev.T]``, with each layer's
        bias as one more column of its weight (``MaskedLinear.augmented_weight``, the last
        layer's output rows reordered once): each parameter of every feature comes out as one
        contiguous row, so an element-wise kernel works on whole planes, not on a short last
        axis, and no pass adds a bias. The last layer takes one matmul per group, over the prefix
        of hidden units that the group's features may read (``self.widths``). Lean path only
        (no autograd)."""
        n = x.shape[0]
        linears = [m for m in self.net if isinstance(m, MaskedLinear)]
        acts = [m for m in self.net if not isinstance(m, MaskedLinear)]
        h = x.new_empty(1 + self.context + self.features, n)
        h[0].fill_(1.0)
        if context is not None:
            h[1 : 1 + self.context].copy_(context.T)
        xt = h[1 + self.context :]
        xt.copy_(x.T)
        for layer, act in zip(linears[:-1], acts, strict=True):
            weight = layer.augmented_weight()
            nxt = x.new_empty(1 + weight.shape[0], n)
            nxt[0].fill_(1.0)
            body = nxt[1:]
            torch.mm(weight, h, out=body)
            result = act(body)
            if result.data_ptr() != body.data_ptr():  # an activation that is not in place
                body.copy_(result)
            h = nxt
        order = tuple(range(self.params)) if order is None else tuple(order)
        weight = linears[-1].augmented_weight(self.features, order, groups)
        size = self.features // groups
        rows = len(order) * size  # a group's output rows
        planes = pad[0] + len(order) + pad[1]
        out = x.new_empty(groups, planes * size * n)
        for g in range(groups):
            used = 1 + self.widths[(g + 1) * size - 1][-1]  # the bias, then a prefix of units
            body = out[g, pad[0] * size * n :][: rows * n].view(rows, n)
            torch.mm(weight[g * rows : (g + 1) * rows, :used], h[:used], out=body)
        return out.view(groups, planes, size, n), xt

    def feature_params(self, x: Tensor, context: Tensor | None, i: int) -> Tensor:
        """The parameters of feature ``i`` alone, shape ``(N, params)``, from ``x[:, :i]``.

        Equal to ``forward(x, context)[:, i]`` but it only touches the units of degree <= i (a
        prefix, since degrees are sorted) and feature i's output rows: a sequential inversion
        over all features costs about a third of ``features`` full passes.
        """
        widths = self.widths[i]
        h = x[..., :i] if context is None else torch.cat([context, x[..., :i]], dim=-1)
        linears = [m for m in self.net if isinstance(m, MaskedLinear)]
        acts = [m for m in self.net if not isinstance(m, MaskedLinear)]
        for layer, act, n_in, n_out in zip(linears[:-1], acts, widths[:-1], widths[1:],
                                           strict=True):
            w = layer.masked_weight()[:n_out, :n_in]
            h = act((h @ w.T).add_(layer.bias[:n_out]))
        last = linears[-1]
        rows = slice(i * self.params, (i + 1) * self.params)
        w = last.masked_weight()[rows, : widths[-1]]
        return (h @ w.T).add_(last.bias[rows])

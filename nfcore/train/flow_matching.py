"""Flow matching (Lipman et al. 2023): a CNF's vector field trained by regression, with no ODE solve.

Along the conditional optimal-transport path from a base point ``x0 ~ N(0, I)`` to a data point
``x1``, ``x_t = (1 - (1 - sigma) t) x0 + t x1``, the velocity is ``u = x1 - (1 - sigma) x0``; the
loss is ``E ||v(t, x_t, c) - u||^2`` over ``t ~ U(0, 1)``, data and noise. Its minimiser's flow
carries the base to the data distribution. With ``ot=True`` the noise and the data of a batch are
paired by the exact optimal assignment (mini-batch OT, Tong et al. 2023), which straightens the
paths (fewer solver steps when scoring and sampling).

The flow must end in one ``cnf`` layer (next to the base). The layers in front of it (the
``standardize`` layer of the ``cnf`` preset, say) are held at their initial, data-fitted values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..flow import Flow
from ..layers import CNF
from .losses import MaximumLikelihood

__all__ = ["FlowMatching", "density_loss", "DENSITY_LOSSES"]

#: The names ``fit_density(..., loss=...)`` accepts.
DENSITY_LOSSES = ("likelihood", "flow_matching")


def _cnf(flow: Flow) -> CNF:
    layers = list(flow.layers)
    if not layers or not isinstance(layers[-1], CNF) or any(
            isinstance(layer, CNF) for layer in layers[:-1]):
        kinds = [entry["type"] for entry in flow.spec["layers"]]
        raise ValueError(f"Expected a flow whose last layer is its only 'cnf' layer for flow "
                         f"matching; got layers {kinds}")
    return layers[-1]


class FlowMatching:
    """Conditional flow matching with optimal-transport paths, for a flow ending in a CNF layer.

    References: Lipman et al., "Flow Matching for Generative Modeling" (2023); Tong et al.,
    "Improving and Generalizing Flow-Based Generative Models with Minibatch Optimal Transport"
    (2023).

    Arguments:
        sigma_min: the width of the path's end at the data (0: straight lines, as in rectified
            flow).
        ot: pair noise and data within each batch by the optimal assignment (unconditional flows).

    Example:
        >>> import nfcore, torch
        >>> flow = nfcore.build({"preset": "cnf", "dim": 2, "hidden": [8]})
        >>> FlowMatching()(flow, torch.zeros(4, 2), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([])
    """

    def __init__(self, *, sigma_min: float = 0.0, ot: bool = False):
        if not (isinstance(sigma_min, int | float) and 0 <= sigma_min < 1):
            raise ValueError(f"Expected sigma_min in [0, 1); got {sigma_min!r}")
        self.sigma_min = float(sigma_min)
        self.ot = bool(ot)

    def __call__(self, flow: Flow, x: Tensor, context: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        cnf = _cnf(flow)
        if self.ot and context is not None:
            raise ValueError("Expected an unconditional flow for mini-batch OT couplings; pairing "
                             "across contexts would mix their distributions")
        context = flow.embed(context)
        with torch.no_grad():
            for layer in flow.layers[:-1]:
                x, _ = layer(x, context)
        n = x.shape[0]
        x0 = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        t = torch.rand(n, generator=generator, dtype=x.dtype).to(x.device)
        if self.ot:
            x0 = x0[_assignment(x0, x)]
        s = 1.0 - self.sigma_min
        xt = (1.0 - s * t[:, None]) * x0 + t[:, None] * x
        v = cnf.field.velocity(t, xt, context)
        return ((v - (x - s * x0)) ** 2).sum(-1).mean()


def _assignment(x0: Tensor, x1: Tensor) -> Tensor:
    """Indices ``p`` such that ``x0[p]`` is the optimal (squared-distance) pairing with ``x1``."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.detach().double(), x1.detach().double()).square().cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    p = torch.empty(len(rows), dtype=torch.long)
    p[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return p.to(x0.device)


def density_loss(flow: Flow, loss: Any = None) -> tuple[
        Callable[[Flow, Tensor, Tensor | None, torch.Generator], Tensor], str]:
    """The step loss ``fit_density`` uses and its name: ``"likelihood"`` (maximum likelihood),
    ``"flow_matching"`` (``FlowMatching()``), a ``FlowMatching`` instance, or ``None``: flow
    matching for a flow whose last layer is its only ``cnf`` layer, maximum likelihood otherwise
    (for a stack of CNF layers too)."""
    if loss is None:
        cnfs = [isinstance(layer, CNF) for layer in flow.layers]
        loss = "flow_matching" if sum(cnfs) == 1 and cnfs[-1] else "likelihood"
    if loss == "flow_matching":
        loss = FlowMatching()
    if isinstance(loss, FlowMatching):
        _cnf(flow)
        name = "flow_matching" + ("+ot" if loss.ot else "")
        return loss, name
    if loss == "likelihood":
        ml = MaximumLikelihood()
        return (lambda f, x, c, _generator: ml(f, x, c)), "likelihood"
    raise ValueError(f"Expected loss in {list(DENSITY_LOSSES)}, a FlowMatching or None; "
                     f"got {loss!r}")

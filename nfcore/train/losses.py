"""Training objectives, separate from the loop: maximum likelihood on data and the reverse-KL ELBO.

Each loss is a small callable returning a scalar to minimize plus per-sample diagnostics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from ..flow import Flow
from ..targets import Target

__all__ = ["MaximumLikelihood", "ReverseKL", "beta_schedule"]


class MaximumLikelihood:
    """Forward KL up to a constant: ``-mean log q(x)`` over a batch of data.

    Example:
        >>> import nfcore, torch
        >>> flow = nfcore.build({"preset": "maf", "dim": 2, "transforms": 1, "hidden": [8]})
        >>> MaximumLikelihood()(flow, torch.zeros(4, 2)).shape
        torch.Size([])
    """

    def __call__(self, flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, ladj = flow.transform(x, context)
        return -(flow.base_log_prob(z) + ladj).mean()


class ReverseKL:
    """The negative ELBO, ``mean(log q(x) - beta * log p~(x))`` with ``x = T(eps)``, reparametrised.

    ``KL(q || p) = -ELBO + log Z`` at ``beta = 1``, so minimizing it needs no ``log Z``.

    With ``path=True`` the gradient is the path derivative alone ("sticking the landing"): ``log q``
    is scored by a copy of the flow whose parameters are held fixed, so only the samples carry the
    gradient. The loss has the same value and expectation; the dropped term, the score function,
    has mean zero but does not vanish as ``q`` approaches ``p``, whereas the path derivative does.
    It costs one scoring pass (``Flow.log_prob``) per step on top of the sampling pass.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows" (2015), eq. (15);
    Roeder, Wu & Duvenaud, "Sticking the Landing" (2017).
    """

    def __init__(self, target: Target, *, path: bool = False):
        self.target = target
        self.path = path
        self._fixed: Flow | None = None

    def _log_q_fixed(self, flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log q(x)`` with gradients to ``x`` only, from a copy of ``flow`` kept in sync."""
        if self._fixed is None:
            self._fixed = copy.deepcopy(flow).requires_grad_(False)
        with torch.no_grad():
            for fixed, live in zip(self._fixed.parameters(), flow.parameters(), strict=True):
                fixed.copy_(live)
        return self._fixed.log_prob(x, context)

    def __call__(self, flow: Flow, noise: Tensor, beta: float = 1.0,
                 context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the loss and the per-sample log importance weights ``log p~ - log q``. With a
        ``context`` (one row per noise row, for a conditional flow and target), the loss is the
        negative ELBO averaged over those contexts: amortized variational inference."""
        x, log_q = flow.sample_from_noise(noise, context)
        log_p = self.target.log_prob(x) if context is None else self.target.log_prob(x, context)
        scored = self._log_q_fixed(flow, x, context) if self.path else log_q
        loss = (scored - beta * log_p).mean()
        return loss, (log_p - log_q).detach()


def beta_schedule(anneal_steps: int, start: float = 0.01) -> Callable[[int], float]:
    """Inverse temperature at step ``t``: linear from ``start`` to 1 over ``anneal_steps``, then 1."""
    if anneal_steps <= 0:
        return lambda t: 1.0
    return lambda t: min(1.0, start + (1.0 - start) * t / anneal_steps)

"""Importance-weight arithmetic: Pareto-smoothed importance sampling and the plain estimates (ELBO,
ESS, log Z) from a batch of log weights ``log p~(x) - log q(x)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["psis", "importance_diagnostics"]


def psis(log_w: Tensor) -> tuple[Tensor, float]:
    """Pareto-smoothed, self-normalised log weights and the Pareto k̂ of ``log_w`` (1-D).

    From ``arviz_stats`` (ArviZ's NumPy core), which smooths the largest weights with a fitted
    generalized Pareto distribution. Non-finite log weights (``p~ = 0``) count as weight zero.
    k̂ below -1 (bounded weights: a flat tail, as when ``q`` equals the target, gives -inf) is
    reported as -1.

    Example:
        >>> import torch
        >>> smoothed, k = psis(torch.zeros(1000))
        >>> round(float(smoothed.exp().sum()), 6), k < 0.5
        (1.0, True)
    """
    from arviz_stats.base import array_stats  # imports scipy (~1 s): only fits need it

    w = log_w.detach().double().cpu()
    w = torch.where(torch.isnan(w) | (w == math.inf), torch.full_like(w, -math.inf), w)
    finite = torch.isfinite(w)
    if int(finite.sum()) < 5:
        return torch.full_like(w, -math.log(max(w.numel(), 1))), math.inf
    floor = float(w[finite].min()) - 50.0  # weight exp(-50) of the smallest: zero in effect
    w = torch.where(finite, w, torch.full_like(w, floor))
    try:
        smoothed, k = array_stats.psislw((-w).numpy())  # arviz smooths exp(-ary)
    except ValueError:  # "All tail values are the same": the weights are bounded and flat
        return w - torch.logsumexp(w, 0), -1.0
    return torch.from_numpy(smoothed.copy()), max(float(k), -1.0)


@torch.no_grad()
def importance_diagnostics(log_w: Tensor, log_z: float | None) -> dict[str, float | None]:
    """ELBO, effective-sample-size fraction, importance estimate of log Z, and KL when log Z is known."""
    log_w = log_w.double()
    n = log_w.numel()
    finite = torch.isfinite(log_w)
    elbo = float(log_w.mean())
    lse = torch.logsumexp(log_w, 0)
    ess = float(torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, 0))) / n
    out: dict[str, float | None] = {
        "elbo": elbo,
        "elbo_stderr": float(log_w[finite].std() / n**0.5) if int(finite.sum()) > 1 else None,
        "ess_fraction": ess,
        "log_z_estimate": float(lse - math.log(n)),
        "kl": None if log_z is None else log_z - elbo,
    }
    return out

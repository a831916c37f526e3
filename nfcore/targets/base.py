"""``Target``: an unnormalized log density ``log p~(z)`` over ``R^dim`` for reverse-KL training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import TargetError

__all__ = ["Target"]


class Target:
    """An unnormalized log density over ``R^dim``, batched over rows.

    Arguments:
        name: a short name, reported in training summaries.
        dim: the dimension of ``z``.
        log_prob: maps ``z`` of shape ``(N, dim)`` to ``log p~(z)`` of shape ``(N,)``.
        log_z: ``log`` of the normalizing constant ``int p~(z) dz`` when known, else ``None``.
        sampler: optional ``sampler(n, generator) -> Tensor (n, dim)`` of exact samples.
        description: free text for people.
        spec: JSON that rebuilds it through ``nfcore.targets.from_spec`` (built-ins, expressions).

    Example:
        >>> import torch
        >>> t = Target("normal", 2, lambda z: -0.5 * (z * z).sum(-1), log_z=1.8378770664093453)
        >>> t.log_prob(torch.ones(3, 2))
        tensor([-1., -1., -1.])
    """

    def __init__(
        self,
        name: str,
        dim: int,
        log_prob: Callable[[Tensor], Tensor],
        *,
        log_z: float | None = None,
        sampler: Callable[[int, torch.Generator | None], Tensor] | None = None,
        description: str = "",
        spec: dict[str, Any] | None = None,
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise TargetError(f"Expected a positive integer dim; got {dim!r}")
        if not callable(log_prob):
            raise TargetError(f"Expected a callable log_prob; got {type(log_prob).__name__}")
        self.name = name
        self.dim = dim
        self._log_prob = log_prob
        self.log_z = None if log_z is None else float(log_z)
        self._sampler = sampler
        self.description = description
        #: A JSON description that rebuilds the target (``targets.from_spec``), when there is one.
        self.spec = spec

    def __repr__(self) -> str:
        return f"Target({self.name!r}, dim={self.dim}, log_z={self.log_z})"

    @property
    def has_sampler(self) -> bool:
        return self._sampler is not None

    def log_prob(self, z: Tensor) -> Tensor:
        """``log p~(z)`` of shape ``(N,)`` for ``z`` of shape ``(N, dim)``."""
        if z.ndim != 2 or z.shape[-1] != self.dim:
            raise TargetError(f"Expected z of shape (N, {self.dim}); got {tuple(z.shape)}")
        out = self._log_prob(z)
        if not isinstance(out, Tensor) or out.shape != z.shape[:1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TargetError(f"Target {self.name!r} must return a tensor of shape "
                              f"({z.shape[0]},); got {got}")
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples, shape ``(n, dim)``; only for targets that know how."""
        if self._sampler is None:
            raise TargetError(f"Target {self.name!r} has no exact sampler")
        return self._sampler(n, generator)

"""A served flow as a ``torch.distributions.Distribution``: ``RemoteFlow(client, "u1")``.

Existing MCMC and importance-sampling code takes it wherever it takes a distribution, as a
proposal for instance: ``log_prob(x)`` scores through ``POST /log_prob``, ``sample(shape)`` and
``sample_and_log_prob(shape, seed=…)`` draw through ``POST /sample`` (large batches travel as
safetensors, as the client decides). ``event_shape`` is ``(dim,)``; a conditional model is fixed
at the ``context`` given. A model fit to a model-language target with constrained parameters
(``GET /models/{name}`` shows its ``target``) is a distribution over its parameter columns, in
their constrained space, with the matching ``support``; derived columns are left out.

It needs torch: ``pip install 'nfserve[torch]'``. The rest of the client does not, and never
imports this module.

Example:
    >>> from service.client import Client
    >>> from service.remote import RemoteFlow
    >>> with Client("http://127.0.0.1:8000") as nf:             # doctest: +SKIP
    ...     q = RemoteFlow(nf, "u1", seed=0)
    ...     x, log_q = q.sample_and_log_prob((1000,))
    ...     q.log_prob(x).shape, q.event_shape
    (torch.Size([1000]), torch.Size([2]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution, constraints

__all__ = ["RemoteFlow", "support_of"]


def _entries(declaration: Mapping[str, Any]) -> int:
    return math.prod(declaration.get("shape", []) or [1])


def _column_constraint(declaration: Mapping[str, Any]) -> constraints.Constraint:
    """The element-wise constraint of one parameter's columns."""
    if declaration.get("constraint") == "simplex":
        return constraints.unit_interval  # element-wise; the sum to one is not checked here
    lower, upper = declaration.get("lower"), declaration.get("upper")
    if lower is not None and upper is not None:
        return constraints.interval(float(lower), float(upper))
    if lower is not None:
        return constraints.greater_than(float(lower))
    if upper is not None:
        return constraints.less_than(float(upper))
    return constraints.real


def support_of(params: Mapping[str, Mapping[str, Any]] | None, dim: int
               ) -> constraints.Constraint:
    """The support over ``dim`` columns of a model-language target's ``params`` (declaration
    order = column order): ``real_vector`` when nothing is bounded, else the columns' bounds
    (``lower``/``upper``; a simplex's entries in [0, 1]; an ordered vector by its bounds only).

    Example:
        >>> s = support_of({"mu": {}, "tau": {"lower": 0}, "p": {"shape": [2], "lower": 0,
        ...                 "upper": 1}}, 4)
        >>> s.check(torch.tensor([[-3.0, 0.5, 0.2, 0.9], [1.0, -0.1, 0.5, 0.5]])).tolist()
        [True, False]
    """
    if not params:
        return constraints.real_vector
    parts = [(_column_constraint(d), _entries(d)) for d in params.values()]
    if all(c is constraints.real for c, _ in parts):
        return constraints.real_vector
    if sum(n for _, n in parts) != dim:
        raise ValueError(f"The target's parameters have {sum(n for _, n in parts)} entries; "
                         f"the model has {dim} columns")
    return constraints.independent(
        constraints.cat([c for c, _ in parts], dim=-1, lengths=[n for _, n in parts]), 1)


class RemoteFlow(Distribution):
    """A model on an nfserve server, as a distribution over its ``(dim,)`` events.

    Arguments:
        client: a ``service.client.Client``.
        model: the model's name; ``version`` pins one version (default: the latest now, kept).
        context: for a conditional model, its context (one row), fixed for this distribution.
        seed: seeds the samples: each ``sample`` call draws its server seed from a generator
            started at ``seed``, so a run is reproducible and calls still differ.
        dtype: the dtype of the tensors returned (default: torch's default dtype).
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = False

    def __init__(self, client: Any, model: str, *, version: int | None = None,
                 context: Sequence[float] | np.ndarray | torch.Tensor | None = None,
                 seed: int | None = None, dtype: torch.dtype | None = None,
                 validate_args: bool | None = None):
        info = client.model(model)
        versions = {v["version"]: v for v in info["versions"]}
        if version is None:
            version = info["latest"]
        if version not in versions:
            raise ValueError(f"Model {model!r} has no version {version}; it has "
                             f"{sorted(versions)}")
        meta = versions[version]
        self.client, self.model, self.version = client, model, version
        target = meta.get("target") or {}
        self.columns: list[str] | None = target.get("param_columns")
        dim = len(self.columns) if self.columns else meta["dim"]
        self.context_dim = meta.get("context_dim", 0)
        self.context = None
        if self.context_dim:
            if context is None:
                raise ValueError(f"Model {model!r} is conditional: give a context of "
                                 f"{self.context_dim} values")
            self.context = np.asarray(context, dtype=np.float64).reshape(1, self.context_dim)
        elif context is not None:
            raise ValueError(f"Model {model!r} is unconditional; give no context")
        self._support = support_of(target.get("params"), dim)
        self._seeds = np.random.default_rng(seed) if seed is not None else None
        self.dtype = dtype or torch.get_default_dtype()
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([dim]),
                         validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        return self._support

    def __repr__(self) -> str:
        return (f"RemoteFlow(model={self.model!r}, version={self.version}, "
                f"event_shape={tuple(self.event_shape)})")

    # ------------------------------------------------------------------ the distribution
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(value) for each event of ``value`` (shape ``(*batch, dim)``)."""
        value = torch.as_tensor(value)
        if self._validate_args:
            self._validate_sample(value)
        dim = self.event_shape[0]
        if value.shape[-1:] != (dim,):
            raise ValueError(f"Expected events of shape ({dim},); got a value of shape "
                             f"{tuple(value.shape)}")
        lead = value.shape[:-1]
        rows = np.ascontiguousarray(value.detach().cpu().reshape(-1, dim).numpy())
        if rows.shape[0] == 0:
            return torch.zeros(lead, dtype=self.dtype)
        out = self.client.log_prob(self.model, rows, context=self.context,
                                   version=self.version)
        return torch.as_tensor(np.asarray(out), dtype=self.dtype).reshape(lead)

    def sample_and_log_prob(self, sample_shape: Sequence[int] | torch.Size = torch.Size(),
                            *, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples of shape ``(*sample_shape, dim)`` and their log q, in one request; the same
        ``seed`` gives the same samples."""
        shape = torch.Size(sample_shape)
        n = shape.numel()
        dim = self.event_shape[0]
        if n == 0:
            return torch.zeros((*shape, dim), dtype=self.dtype), torch.zeros(shape,
                                                                              dtype=self.dtype)
        if seed is None and self._seeds is not None:
            seed = int(self._seeds.integers(0, 2**62))
        samples, log_q = self.client.sample(self.model, n, seed=seed, context=self.context,
                                            version=self.version)
        # A model-language fit answers its parameters, then derived quantities: keep the former.
        samples = np.ascontiguousarray(np.asarray(samples)[:, :dim])
        return (torch.as_tensor(samples, dtype=self.dtype).reshape(*shape, dim),
                torch.as_tensor(np.asarray(log_q), dtype=self.dtype).reshape(shape))

    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size(), *,
               seed: int | None = None) -> torch.Tensor:
        """Samples of shape ``(*sample_shape, dim)``."""
        return self.sample_and_log_prob(sample_shape, seed=seed)[0]

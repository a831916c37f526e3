"""Serving a flow fit to a model-language target (``nfcore.targets.model``) in the model's own
terms: constrained values with named columns, derived quantities included.

A variational job publishes the target's JSON text in the artifact's metadata (key ``target``,
``wire.TARGET_METADATA``, written by ``service.training.runner.publish``), so the model cache
rebuilds the ``Target`` whenever it loads the model, after any restart, with no code
(``target_of``). It is stored as text, not as a JSON value, because ``nfcore.save`` writes JSON
values with sorted keys, and the order of ``params`` is the layout of the flow's ``z`` (and that
of ``derived`` the order of the columns). For such a model:

- ``/sample`` answers the samples in the constrained space with ``columns`` (parameters, then
  derived quantities), ``log_prob`` = log q there (the flow's ``log q(z)`` minus the log-Jacobian of
  ``constrain``) and ``target_log_prob``, the model's log density at the same points;
  ``target_log_prob - log_prob`` are importance log-weights;
- ``/log_prob`` takes constrained values, named (``values``: one array per parameter, ``(N, *shape)``)
  or as rows ``x`` in column order, and answers log q in the constrained space; a value outside a
  parameter's support is an ``InvalidInput`` naming the parameter.

Plain flows (no target, or a built-in or expression target over ``z``) are served as before.
The transforms run in float64 in the batcher's thread, around the flow's own pass (``wrap``);
answers of such models are float64.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import nfcore
from nfcore import targets
from nfcore.errors import TargetError
from nfcore.train.diagnostics import diagnose_draws

from ..errors import InvalidInput
from ..wire import TARGET_METADATA
from .batcher import Pending, Run

__all__ = ["target_spec", "target_of", "target_public", "values_rows", "wrap"]

def target_spec(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The model-language target a model was fit to, from its artifact metadata (values decoded
    or still JSON text, as ``flow.metadata`` has them); None for a flow fit to data, to a built-in
    or to an expression over ``z``. (The fit's summary, ``training.target_spec``, is not used:
    ``nfcore.save`` sorted its keys, and with them the parameters.)"""
    spec = _decoded((metadata or {}).get(TARGET_METADATA))
    return dict(spec) if isinstance(spec, Mapping) and "params" in spec else None


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def builtin_target_of(metadata: Mapping[str, Any] | None, dim: int) -> targets.Target | None:
    """The built-in target (``nfcore.targets.get(name)``) a variational job fit a model to, named
    in its training summary; None when there is none, the name is unknown here, or the target's
    dimension differs from the flow's (a target built with options the summary does not keep).
    It scores the model's draws for ``diagnose``; the answers stay those of a plain flow."""
    training = _decoded((metadata or {}).get("training"))
    if not isinstance(training, Mapping) or training.get("objective") != "variational":
        return None
    name = training.get("target")
    if not isinstance(name, str):
        return None
    try:
        target = targets.get(name)
    except TargetError:
        return None
    return target if target.dim == dim and not target.context_dim else None


def diagnose(samples: Any, log_q: Any, target_log_prob: Any = None,
             builtin: targets.Target | None = None) -> dict[str, Any]:
    """``nfcore.train.diagnose_draws`` of drawn ``samples`` and their ``log_q``, against the
    model-language target's ``target_log_prob`` when given, else ``builtin``'s density at the
    samples (see ``builtin_target_of``). For ``/sample`` and ``nfserve sample --diagnose``."""
    x = torch.as_tensor(samples).double()
    if target_log_prob is not None:
        log_p = torch.as_tensor(target_log_prob)
    else:
        with torch.inference_mode():
            log_p = builtin.log_prob(x)
    return diagnose_draws(x, torch.as_tensor(log_q), log_p)


@functools.lru_cache(maxsize=64)
def _build(text: str) -> targets.Target:
    return targets.from_spec(json.loads(text))


def target_of(metadata: Mapping[str, Any] | None, dim: int) -> targets.Target | None:
    """The ``Target`` of a model's metadata (see ``target_spec``), built once per distinct spec;
    ``TargetError`` when the stored spec does not build or does not match the flow's ``dim``."""
    spec = target_spec(metadata)
    if spec is None:
        return None
    target = _build(json.dumps(spec))  # key order matters: it orders the columns
    if target.dim != dim:
        raise TargetError(f"the stored target has {target.dim} unconstrained dimensions; the "
                          f"flow has dim {dim}")
    return target


def target_public(target: targets.Target) -> dict[str, Any]:
    """What ``GET /models/{name}`` shows of a model's target."""
    spec = target.spec or {}
    return {"params": spec.get("params", {}), "derived": spec.get("derived", {}),
            "param_columns": target.param_columns, "derived_columns": target.derived_columns,
            "columns": target.columns}


def values_rows(target: targets.Target, values: Any = None, x: Any = None) -> np.ndarray:
    """Constrained values as float64 rows ``(N, len(param_columns))``, from ``values`` (parameter
    name -> array ``(N, *shape)``) or from rows ``x`` in column order (``param_columns``, or every
    column of a /sample answer, whose derived columns are then ignored). ``InvalidInput`` naming
    the field, parameter and shape otherwise. Numpy only: it runs on the event loop."""
    width, full = len(target.param_columns), len(target.columns)
    if (values is None) == (x is None):
        raise InvalidInput("give the parameter values as 'values' (an object of parameter name "
                           "-> array) or as rows 'x' in column order, not both" if x is not None
                           else "values: field required (an object of parameter name -> array)")
    if x is not None:
        rows = _numbers("x", x)
        if rows.ndim != 2 or rows.shape[1] not in (width, full) or rows.shape[0] == 0:
            raise InvalidInput(f"x must have shape (rows, {width}): one column per "
                               f"{target.param_columns} (or the {full} columns of a /sample "
                               f"answer); got shape {tuple(rows.shape)}")
        return _finite("x", np.ascontiguousarray(rows[:, :width]))
    if not isinstance(values, Mapping):
        raise InvalidInput(f"values must be an object of parameter name -> array; got "
                           f"{type(values).__name__}")
    shapes = target.param_shapes
    unknown = sorted(str(k) for k in values if k not in shapes)
    if unknown:
        raise InvalidInput(f"values.{unknown[0]}: unknown parameter; the parameters are "
                           f"{list(shapes)}")
    missing = [k for k in shapes if k not in values]
    if missing:
        raise InvalidInput(f"values.{missing[0]}: missing; give every parameter of "
                           f"{list(shapes)}")
    parts, rows_seen = [], None
    for name, shape in shapes.items():
        arr = _numbers(f"values.{name}", values[name])
        expected = "(N" + "".join(f", {k}" for k in shape) + ")"
        if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != shape or arr.shape[0] == 0:
            raise InvalidInput(f"values.{name}: expected shape {expected}, one row per point; "
                               f"got shape {tuple(arr.shape)}")
        if rows_seen is not None and arr.shape[0] != rows_seen:
            raise InvalidInput(f"values.{name}: has {arr.shape[0]} rows; the parameters before "
                               f"it have {rows_seen}")
        rows_seen = arr.shape[0]
        parts.append(_finite(f"values.{name}", arr.reshape(rows_seen, math.prod(shape))))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def _numbers(what: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{what} must be a rectangular array of numbers: {e}") from None
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise InvalidInput(f"{what} must be a rectangular array of numbers; got elements of "
                           f"type {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _finite(what: str, arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise InvalidInput(f"{what} holds NaN or infinite values (first at row {row})")
    return arr


def _check_support(target: targets.Target, values: torch.Tensor) -> None:
    """``InvalidInput`` naming the first parameter with a row outside its support."""
    params = getattr(target, "params", None)
    if params is None:  # a target without per-parameter transforms: its own check
        inside = target.in_support(values)
        if not bool(inside.all()):
            raise InvalidInput(f"row {int((~inside).nonzero()[0, 0])} is outside the support")
        return
    for p, x in zip(params, target.unpack(values).values(), strict=True):
        inside = p.in_support(x)
        if not bool(inside.all()):
            row = int((~inside).nonzero()[0, 0])
            got = x[row].tolist()
            raise InvalidInput(f"values.{p.name}: row {row} is outside the parameter's support "
                               f"({p.describe()}); got {got}")


def wrap(run: Run, flow: nfcore.Flow, target: targets.Target) -> Run:
    """The batch pass of a flow fit to ``target``, in the constrained space, around the flow's
    pass ``run`` (``service.inference.forward``): a ``sample`` batch gives ``(samples, log_prob,
    target_log_prob)`` per request; a ``log_prob`` batch, whose requests hold constrained values
    ``(rows, len(param_columns))`` as ``x``, gives log q in the constrained space."""
    dtype = {torch.float32: np.float32, torch.float64: np.float64}[flow.dtype]

    def sample(batch: list[Pending]) -> list[Any]:
        out = []
        for p, (z, log_q) in zip(batch, run(batch), strict=True):
            # an amortized posterior: the model's density at this request's context
            context = None if p.context is None else torch.from_numpy(p.context).double()
            with torch.inference_mode():
                d = target.draws(torch.from_numpy(z).double(), torch.from_numpy(log_q).double(),
                                 context)
            out.append((d.samples.numpy(), d.log_prob.numpy(), d.target_log_prob.numpy()))
        return out

    def log_prob(batch: list[Pending]) -> list[Any]:
        items, ladjs = [], []
        with torch.inference_mode():
            for p in batch:
                values = torch.from_numpy(p.x)
                _check_support(target, values)
                z = target.unconstrain(values)
                ladjs.append(target.constrain(z)[1].numpy())
                items.append(dataclasses.replace(p, x=np.ascontiguousarray(z.numpy(), dtype)))
        return [lp.astype(np.float64) - ladj
                for lp, ladj in zip(run(items), ladjs, strict=True)]

    def wrapped(batch: list[Pending]) -> list[Any]:
        return sample(batch) if batch[0].kind == "sample" else log_prob(batch)

    return wrapped

"""What a training request is made of and must satisfy, for ``POST /train`` and ``nfserve train``
alike: the flow spec, the objective, the data's shape and the training options, with their one set
of defaults and the budget rules. Everything is checked here, once, before anything is stored or
trained, so a bad request is an ``InvalidInput`` naming the field rather than a failed job later.

Budget rules (nfcore's, which the service follows by passing on only the options given):

- ``max_seconds`` alone: train until the time budget or early stopping, whichever comes first;
- ``steps`` (or, for density jobs, ``epochs``) alone: exactly that many steps, early stopping aside;
- both: whichever comes first;
- neither: ``nfcore.train.DEFAULT_STEPS[kind]`` steps.

Every other option left out takes nfcore's default, read from the signatures of
``nfcore.fit_density`` and ``nfcore.fit_target`` (``DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

import nfcore
from nfcore import targets
from nfcore.errors import SpecError, TargetError
from nfcore.train import DEFAULT_STEPS

from ..errors import InvalidInput
from ..settings import Settings

__all__ = ["KINDS", "OPTIONS", "DEFAULTS", "DEFAULT_STEPS", "BUDGET_RULES", "default_text",
           "fit_options",
           "planned_steps", "time_only", "budgeted", "checked_spec", "checked_target",
           "check_data", "check_budget", "load_plugins"]

KINDS = ("density", "variational")
_FITS: dict[str, Callable[..., Any]] = {"density": nfcore.fit_density,
                                        "variational": nfcore.fit_target}

#: Each option and the objective kinds that take it.
OPTIONS: dict[str, tuple[str, ...]] = {
    "steps": KINDS, "epochs": ("density",), "max_seconds": KINDS, "batch_size": KINDS,
    "lr": KINDS, "seed": KINDS, "validation_fraction": ("density",),
    "anneal_steps": ("variational",), "loss": ("density",),
}


def _defaults() -> dict[str, dict[str, Any]]:
    budget = ("steps", "epochs", "max_seconds")  # see BUDGET_RULES
    return {kind: {name: inspect.signature(_FITS[kind]).parameters[name].default
                   for name, kinds in OPTIONS.items() if kind in kinds and name not in budget}
            for kind in KINDS}


#: The default of every option but the budget, by objective kind: nfcore's own.
DEFAULTS: dict[str, dict[str, Any]] = _defaults()


def default_text(name: str) -> str:
    """How the docs state the default of option ``name`` (per kind where the kinds differ).

    Example:
        >>> default_text("batch_size"), default_text("anneal_steps")
        ('256', '0')
    """
    values = {kind: DEFAULTS[kind][name] for kind in KINDS if name in DEFAULTS[kind]}
    texts = {kind: f"{v:g}" if isinstance(v, float) else str(v) for kind, v in values.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return ", ".join(f"{text} for {kind} jobs" for kind, text in texts.items())


BUDGET_RULES = (
    "A time budget (max_seconds) alone trains until it runs out or early stopping; a step count "
    "(steps, or epochs for density jobs) alone trains exactly that many steps, early stopping "
    "aside; both: whichever comes first; neither: "
    f"{DEFAULT_STEPS['density']} steps for density jobs and {DEFAULT_STEPS['variational']} for "
    "variational ones (nfcore.train.DEFAULT_STEPS).")


def fit_options(kind: str, training: dict[str, Any]) -> dict[str, Any]:
    """The options to pass to nfcore's fit: those given (not None), checked against ``kind``.

    Example:
        >>> fit_options("density", {"max_seconds": 90, "steps": None, "lr": None})
        {'max_seconds': 90}
    """
    given = {k: v for k, v in training.items() if v is not None}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise InvalidInput(f"training.{unknown[0]}: unknown option; the options are "
                           f"{sorted(OPTIONS)}")
    for name in given:
        if kind not in OPTIONS[name]:
            other = "density" if kind == "variational" else "variational"
            raise InvalidInput(f"training.{name}: only for {other} jobs")
    if "steps" in given and "epochs" in given:
        raise InvalidInput("training: give 'steps' or 'epochs', not both")
    return given


def time_only(training: dict[str, Any]) -> bool:
    """Whether the budget is a time budget alone (no step count, no epochs)."""
    return (training.get("max_seconds") is not None and training.get("steps") is None
            and training.get("epochs") is None)


def planned_steps(kind: str, training: dict[str, Any], rows: int | None = None) -> int | None:
    """The steps a fit will take at most, by the budget rules; None for a time budget alone.

    Example:
        >>> planned_steps("variational", {}) == DEFAULT_STEPS["variational"]
        True
        >>> planned_steps("density", {"max_seconds": 9.0}) is None
        True
        >>> planned_steps("density", {"epochs": 2, "batch_size": 100}, rows=1000)
        18
    """
    if training.get("steps") is not None:
        return int(training["steps"])
    if training.get("epochs") is not None:
        fraction = training.get("validation_fraction",
                                DEFAULTS[kind]["validation_fraction"])
        n = int(rows or 0)
        n_val = 0 if fraction == 0 else min(max(1, round(n * fraction)), n - 1)
        batch = min(training.get("batch_size") or DEFAULTS[kind]["batch_size"], n - n_val)
        return int(training["epochs"]) * math.ceil((n - n_val) / batch)
    if training.get("max_seconds") is not None:
        return None
    return DEFAULT_STEPS[kind]


def budgeted(training: dict[str, Any], progress: nfcore.Progress) -> nfcore.Progress:
    """``progress`` as a client should read it: under a time budget alone there is no step
    total, and the time left is what remains of the budget.

    Example:
        >>> p = nfcore.Progress(step=40, total=10**9, loss=1.0, val_loss=None, elapsed=2.5, eta=1e6)
        >>> budgeted({"max_seconds": 10}, p).total, budgeted({"max_seconds": 10}, p).eta
        (None, 7.5)
        >>> budgeted({"steps": 100, "max_seconds": 10}, p) is p
        True
    """
    if not time_only(training):
        return progress
    left = max(float(training["max_seconds"]) - progress.elapsed, 0.0)
    return dataclasses.replace(progress, total=None, eta=left)


# ---------------------------------------------------------------------- the request's parts
def checked_spec(flow: dict[str, Any]) -> dict[str, Any]:
    """The normalized spec, or ``InvalidInput`` naming the field (``flow.<field>: …``)."""
    try:
        return nfcore.normalize_spec(flow)
    except SpecError as e:
        where = f"flow.{e.field}" if e.field else "flow"
        raise InvalidInput(f"{where}: {e.message}") from None


def checked_target(target_spec: dict[str, Any], spec: dict[str, Any]) -> targets.Target:
    """The target of a variational objective (``{"builtin", "options"}``, an expression, or a
    model in the model language), built and evaluated on a few points, so that shape errors
    between ``z`` and the constants surface now; ``InvalidInput`` (``objective.target: …``, then
    the field and position the target names, e.g. ``log_prob[2]: … at line 1, column 7``)
    otherwise."""
    try:
        target = targets.from_spec(target_spec)
    except TargetError as e:
        raise InvalidInput(f"objective.target: {e}") from None
    if target.dim != spec["dim"]:
        what = (f"the model has {target.dim} unconstrained reals ("
                + ", ".join(f"{p.name}: {p.free}" for p in target.params) + ")"
                if isinstance(target, targets.ModelTarget)
                else f"the target has dimension {target.dim}")
        raise InvalidInput(f"objective.target: {what}; the flow has dim {spec['dim']}")
    if spec["context_dim"] != target.context_dim:
        raise InvalidInput(
            f"flow.context_dim: the model's context rows have {target.context_dim} numbers "
            f"({', '.join(target.context_columns[:6])}); the flow has context_dim "
            f"{spec['context_dim']}" if target.context_dim else
            "flow.context_dim: variational jobs on a target without a 'context' block train "
            "unconditional flows; use context_dim 0")
    z = torch.randn(4, target.dim, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64 if spec["dtype"] == "float64" else torch.float32)
    context = [0.0] * target.context_dim if target.context_dim else None
    try:
        with torch.no_grad():
            out = target.log_prob(z, context)
    except (TargetError, RuntimeError, ValueError, IndexError, TypeError) as e:
        raise InvalidInput(f"objective.target: log_prob fails on test points of shape "
                           f"(4, {target.dim}): {e}") from None
    if torch.isnan(out).all():
        raise InvalidInput("objective.target: log_prob is NaN at every test point")
    return target


def check_data(rows: int, dim: int, context_dim: int, spec: dict[str, Any]) -> None:
    """The data fit the flow: as many columns as its dim, its context, at least two rows."""
    if dim != spec["dim"]:
        raise InvalidInput(f"objective: the data has {dim} columns; the flow has dim "
                           f"{spec['dim']}")
    if context_dim != spec["context_dim"]:
        raise InvalidInput(f"objective: the data has context of dimension {context_dim}; "
                           f"the flow has context_dim {spec['context_dim']}")
    if rows < 2:
        raise InvalidInput(f"objective: the data has {rows} row; training needs at least 2")


def check_budget(kind: str, training: dict[str, Any], settings: Settings,
                 rows: int | None = None) -> int | None:
    """Check the options of a ``kind`` job; the steps planned (None for a time budget alone)."""
    fit_options(kind, training)
    steps = planned_steps(kind, training, rows)
    if steps is not None and steps > settings.max_train_steps:
        raise InvalidInput(f"training: {steps} steps is over the limit of "
                           f"{settings.max_train_steps} (NFSERVE_MAX_TRAIN_STEPS)")
    seconds = training.get("max_seconds")
    if seconds is not None and seconds > settings.max_train_seconds:
        raise InvalidInput(f"training: max_seconds {seconds:g} is over the limit of "
                           f"{settings.max_train_seconds:g} (NFSERVE_MAX_TRAIN_SECONDS)")
    return steps


def load_plugins(settings: Settings) -> None:
    """Import the operator's plugin modules (``NFSERVE_PLUGINS``); they register targets."""
    for module in settings.plugins:
        importlib.import_module(module)

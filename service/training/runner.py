"""The one training path, for a worker's job and for ``nfserve train`` alike: build the flow from
its spec, fit it with exactly the options the client gave (nfcore applies its own rules and
defaults to the rest), and publish the result as the model's next version.

The flow's initial weights are drawn from the training seed, so the same request on the same data
gives the same model wherever it runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import nfcore
from nfcore import targets

from ..store import ModelStore
from ..wire import TARGET_METADATA
from .requests import DEFAULTS, budgeted, fit_options

__all__ = ["fit", "publish", "diagnostics"]


def fit(kind: str, spec: dict[str, Any], training: dict[str, Any], *,
        data: tuple[Any, Any] | None = None, target: targets.Target | None = None,
        device: str = "cpu", callback: Callable[[nfcore.Progress], Any] | None = None,
        should_stop: Callable[[], bool] | None = None, checkpoint: Path | None = None,
        checkpoint_every_s: float = 5.0, contexts: Any = None) -> nfcore.FitResult:
    """Fit a new flow of ``spec`` by ``kind`` (``density`` on ``data = (x, context)``, or
    ``variational`` against ``target``, amortized over ``contexts`` rows when given) with the
    ``training`` options given.

    Arguments:
        callback: gets each ``Progress``, as a client should read it (``requests.budgeted``).
        should_stop: checked every step; True stops the fit with ``TrainingCancelled``.
        checkpoint: a file written every ``checkpoint_every_s`` seconds and resumed from when it
            exists (a re-queued job continues where its last attempt stopped).
    """
    options = fit_options(kind, training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.get("seed", DEFAULTS[kind]["seed"]))
        flow = nfcore.build(spec)
    flow = flow.to(device)
    common: dict[str, Any] = {
        "callback": None if callback is None else (lambda p: callback(budgeted(training, p))),
        "should_stop": should_stop, "checkpoint_every_s": checkpoint_every_s, "resume": True,
        "checkpoint_path": None if checkpoint is None else str(checkpoint)}
    if kind == "density":
        if data is None:
            raise ValueError("Expected data = (x, context) for a density fit; got None")
        x, context = data
        return nfcore.fit_density(flow, x, context=context, **options, **common)
    if target is None:
        raise ValueError("Expected a target for a variational fit; got None")
    with torch.enable_grad():  # a worker thread may start in inference mode
        if contexts is not None:  # amortized: a conditional flow over these contexts
            common["contexts"] = contexts
        return nfcore.fit_target(flow, target, **options, **common)


def publish(store: ModelStore, name: str, result: nfcore.FitResult, **source: Any) -> int:
    """Write the fitted flow as the next version of ``name``; ``source`` (e.g. the job id and the
    objective) goes into its metadata beside the training summary. A variational fit's target
    goes under ``wire.TARGET_METADATA`` as JSON text, its keys in their order (the order of a
    model's parameters is the layout of ``z``), so that a server rebuilds the target when it loads
    the model (``service.inference.constrained``). Returns the version."""
    metadata: dict[str, Any] = {"training": result.summary, **source}
    target_spec = result.summary.get("target_spec")
    if isinstance(target_spec, dict):
        metadata[TARGET_METADATA] = json.dumps(target_spec)
    return store.publish(name, result.flow.cpu(), metadata)


def diagnostics(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fit's diagnostics (verdict, reasons, k̂, ESS and tail fractions), when it has them."""
    value = (summary or {}).get("diagnostics")
    return value if isinstance(value, dict) else None

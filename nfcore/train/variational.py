"""``fit_target``: reverse KL (a reparametrised Monte-Carlo ELBO) against an unnormalized density,
from a starting point taken from the target itself, with diagnostics that can say "do not trust
this"."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .. import targets as _targets
from ..errors import TargetError
from ..flow import Flow
from ..targets import Target
from .amortized import check_amortized, fit_amortized
from .diagnostics import evaluate_target
from .loop import FitResult, Loop, Progress, check_common, finite_or_none, generator, resolve_steps
from .losses import ReverseKL, beta_schedule
from .start import GaussianStart, gaussian_samples, pathfinder

__all__ = ["fit_target", "STARTS"]

#: ``fit_target``'s ``start`` options.
STARTS = ("pathfinder", "none")
_PSEUDO_DATA = 4096
_PROBE = 1024


def _resolve(target: Target | str | dict) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return _targets.get(target)
    if isinstance(target, dict):
        return _targets.from_spec(target)
    raise TargetError(f"Expected a Target, a target name or a target object; got "
                      f"{type(target).__name__}")


def _start(flow: Flow, target: Target, seed: int, max_seconds: float) -> GaussianStart | None:
    """Find the Gaussian start and make the flow equal to it: the data-dependent layers set from
    it, the conditioned layers (coupling, autoregressive) reset to the identity."""
    start = pathfinder(target, seed=seed, max_seconds=max_seconds)
    if start is not None and not start.info["identity"]:
        for layer in flow.layers:
            layer.reset_identity()
        flow.initialize(gaussian_samples(start, max(_PSEUDO_DATA, 4 * flow.dim), seed),
                        knots=False)
    return start


def _refuse_lost_precision(flow: Flow, target: Target, start: GaussianStart) -> None:
    """Raise where the posterior is narrower than the flow's dtype can resolve at its location
    (sd 1e-9 around 5 in float32, whose steps there are 5e-7): every sample would round onto a
    few values, the density there is not finite, and training could only diverge."""
    sd = start.factor.square().sum(-1).sqrt()
    step = torch.finfo(flow.dtype).eps * start.mean.abs()
    narrow = (sd < step).nonzero().flatten().tolist()
    if narrow:
        i = narrow[0]
        dtype = str(flow.dtype).removeprefix("torch.")
        raise TargetError(
            f"{target.name!r}: the posterior's sd in coordinate {i} is about {float(sd[i]):.3g} "
            f"around {float(start.mean[i]):.6g}, where {dtype} resolves only steps of about "
            f"{float(step[i]):.3g}: build the flow with \"dtype\": \"float64\", or reparameterize "
            "(fit the offset from a reference value)")


def fit_target(
    flow: Flow,
    target: Target | str | dict,
    *,
    contexts: Any = None,
    steps: int | None = None,
    max_seconds: float | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    clip_grad_norm: float | None = 5.0,
    anneal_steps: int = 0,
    seed: int = 0,
    callback: Callable[[Progress], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | None = None,
    checkpoint_every_s: float = 5.0,
    resume: bool = True,
    ess_samples: int = 20_000,
    report_every: int | None = None,
    gradient: str = "auto",
    start: str = "pathfinder",
    context_batch: int | None = None,
    holdout: float = 0.1,
    start_contexts: int = 4,
) -> FitResult:
    """Fit ``flow`` to ``target`` by minimizing the reverse KL, ``E_q[log q - log p~]``, in place.

    **Start.** With ``start="pathfinder"`` (the default), the fit first finds a Gaussian
    approximation of the target (Laplace approximations along an L-BFGS path, with the exact
    Hessian's curvature, and the leader refined by Gaussian variational inference, see
    ``nfcore.train.start``) and sets the flow's data-side layers from it
    (``standardize`` to its location and scales, ``loc_scale`` to its correlations; every preset
    has both) and resets the coupling and autoregressive layers to the identity, so that the fit
    starts as that Gaussian and targets of any location, scale or correlation land where the flow's layers
    work, and the splines' interval in particular. Where ``N(0, I)`` scores a better ELBO (as for
    the targets of Rezende & Mohamed's §6.1), the flow keeps its own start. ``start="none"`` keeps
    the flow's weights, e.g. to go on from a trained flow.

    **Steps.** Each step pushes ``batch_size`` base samples through the flow (reparametrised) and
    scores them with the target. With ``anneal_steps > 0`` the target is tempered, ``beta * log
    p~`` with beta rising linearly from 0.01 to 1 over that many steps (Rezende & Mohamed 2015,
    §6.1).

    **Budgets.** ``steps`` alone trains exactly that many steps; ``max_seconds`` alone trains until
    the time is up (the start and the closing diagnostics, whose cost is measured on a small batch
    first, fit inside it), with the learning-rate schedule following the clock; both stop at whichever comes first; neither gives ``DEFAULT_STEPS["variational"]``.

    **Diagnostics.** At the end, ``ess_samples`` fresh samples give the ELBO, the importance
    sampling ESS fraction, ``KL(q||p) = log Z - ELBO`` in nats when the target's ``log_z`` is known,
    and ``summary["diagnostics"]``: Pareto k̂, ESS fraction, the share of samples in a spline's
    identity tails, the mass ``q`` misses that the Gaussian start finds, and a verdict (``ok``,
    ``check``, ``unreliable``) with its reasons (see ``nfcore.train.diagnostics``).

    **Amortized fits.** With ``contexts`` (a conditional target, e.g. a model with a ``context``
    block, and a conditional flow of the same ``context_dim``), the fit is of ``q(theta | c)`` for
    every context at once, by the reverse KL averaged over the contexts: each step draws
    ``context_batch`` contexts (default ``min(32, batch_size)``) and ``batch_size //
    context_batch`` samples for each. A share ``holdout`` of the contexts (when there are at
    least 10) is held out, and ``summary["diagnostics"]`` summarizes the diagnostics at up to 32
    of them: k̂'s median and max, the share of contexts whose verdict is ``ok``, an overall
    verdict and each context's figures. The start pools Pathfinder at ``start_contexts`` training
    contexts (see ``nfcore.train.amortized``).

    Arguments:
        flow: an unconditional flow whose ``dim`` equals the target's (for an amortized fit, a
            conditional one whose ``context_dim`` equals the target's).
        contexts: for an amortized fit, the contexts: rows ``(M, context_dim)`` or named values
            ``{name: (M, *shape)}`` (see ``Target.check_context``).
        target: a ``Target``, a built-in/plugin name such as ``"U1"``, or its JSON form
            (``{"builtin": "U1"}`` or ``{"dim", "log_prob", "constants"}``, see
            ``nfcore.targets.from_spec``).
        steps, max_seconds: the budgets (above).
        batch_size, lr, weight_decay, schedule, clip_grad_norm, seed, callback, should_stop,
        checkpoint_path, checkpoint_every_s, resume: as for ``fit_density``.
        report_every: steps between history entries (default: about 200 entries in all, or every
            50 steps on a time budget alone).
        gradient: ``"path"`` (the path derivative alone, "sticking the landing", Roeder et al.
            2017: lower variance near the optimum, one extra scoring pass a step), ``"total"`` (the
            plain reparametrised gradient) or ``"auto"``: path when the flow scores in one pass
            per layer (``flow.fast_log_prob``), total otherwise (planar, IAF).
        start: ``"pathfinder"`` or ``"none"`` (above).

    Example:
        >>> import nfcore, torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> flow = nfcore.build({"preset": "nsf", "dim": 2, "transforms": 2, "hidden": [16]})
        >>> result = nfcore.fit_target(flow, "banana", steps=20, ess_samples=1000)
        >>> sorted(k for k in result.summary if k in ("elbo", "ess_fraction", "kl", "diagnostics"))
        ['diagnostics', 'elbo', 'ess_fraction', 'kl']
    """
    began = time.monotonic()
    check_common(batch_size=batch_size, lr=lr, schedule=schedule, clip_grad_norm=clip_grad_norm,
                 max_seconds=max_seconds, seed=seed, checkpoint_every_s=checkpoint_every_s,
                 weight_decay=weight_decay)
    if not isinstance(flow, Flow):
        raise TypeError(f"Expected an nfcore Flow; got {type(flow).__name__}")
    target = _resolve(target)
    if target.dim != flow.dim:
        raise TargetError(f"Target {target.name!r} has dim {target.dim}; the flow has dim {flow.dim}")
    contexts = check_amortized(flow, target, contexts)
    total = resolve_steps(steps, max_seconds, "variational")
    if isinstance(ess_samples, bool) or not isinstance(ess_samples, int) or ess_samples < 1:
        raise ValueError(f"Expected ess_samples to be a positive integer; got {ess_samples!r}")
    if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
        raise ValueError(f"Expected anneal_steps to be a non-negative integer; got {anneal_steps!r}")
    if gradient not in ("auto", "path", "total"):
        raise ValueError(f"Expected gradient to be 'auto', 'path' or 'total'; got {gradient!r}")
    if start not in STARTS:
        raise ValueError(f"Expected start in {list(STARTS)}; got {start!r}")
    if gradient == "auto":
        gradient = "path" if flow.fast_log_prob else "total"
    every = report_every or (max(1, total // 200) if total is not None else 50)
    if contexts is not None:
        return fit_amortized(
            flow, target, contexts, total=total, max_seconds=max_seconds, batch_size=batch_size,
            context_batch=context_batch, holdout=holdout, start=start,
            start_contexts=start_contexts, lr=lr, weight_decay=weight_decay, schedule=schedule,
            clip_grad_norm=clip_grad_norm, anneal_steps=anneal_steps, seed=seed,
            callback=callback, should_stop=should_stop, checkpoint_path=checkpoint_path,
            checkpoint_every_s=checkpoint_every_s, resume=resume, ess_samples=ess_samples,
            every=every, gradient=gradient, beta=beta_schedule(anneal_steps), began=began)

    gaussian = None
    if start == "pathfinder":
        limit = 60.0 if max_seconds is None else min(60.0, 0.25 * max_seconds)
        gaussian = _start(flow, target, seed, limit)
        if gaussian is not None:
            _refuse_lost_precision(flow, target, gaussian)
    # The budget covers the whole fit: the start, the training and the closing diagnostics, whose
    # cost is measured on a small batch (after one to warm up) and scaled to ``ess_samples``.
    reserve = 0.0
    if max_seconds is not None:
        evaluate_target(flow, target, 64, seed, start=gaussian)
        tick = time.monotonic()
        evaluate_target(flow, target, _PROBE, seed, start=gaussian)
        reserve = (time.monotonic() - tick) * ess_samples / _PROBE
    spent = time.monotonic() - began + reserve
    loop = Loop(flow, steps=total, lr=lr, weight_decay=weight_decay, schedule=schedule,
                clip_grad_norm=clip_grad_norm,
                max_seconds=None if max_seconds is None else max(max_seconds - spent, 1e-3),
                callback=callback, should_stop=should_stop, checkpoint_path=checkpoint_path,
                checkpoint_every_s=checkpoint_every_s, resume=resume, record_every=every,
                seed=seed, batch_size=batch_size,
                fingerprint={"objective": "variational", "spec": flow.spec, "target": target.name,
                             "target_spec": target.spec, "target_text": target.description,
                             "dim": target.dim,
                             "total": total, "batch": batch_size, "lr": lr, "wd": weight_decay,
                             "schedule": schedule, "clip": clip_grad_norm, "anneal": anneal_steps,
                             "seed": seed, "max_seconds": max_seconds, "every": every,
                             "gradient": gradient, "start": start})
    loss_fn = ReverseKL(target, path=gradient == "path")
    beta = beta_schedule(anneal_steps)

    def step(i: int) -> torch.Tensor:
        eps = torch.randn(batch_size, flow.dim, generator=generator(seed, 2, i),
                          dtype=flow.dtype).to(flow.device)
        return loss_fn(flow, eps, beta(i))[0]

    loop.run(step, annotate=lambda i: {"beta": beta(i)})
    metrics = evaluate_target(flow, target, ess_samples, seed, start=gaussian)
    summary = loop.summary(
        objective="variational",
        target=target.name,
        dim=target.dim,
        **{k: finite_or_none(v) if isinstance(v, float) else v for k, v in metrics.items()},
        log_z=target.log_z,
        anneal_steps=anneal_steps,
        gradient=gradient,
        start=None if gaussian is None else gaussian.info,
    )
    summary["max_seconds"] = max_seconds
    summary["wall_s"] = round(time.monotonic() - began, 3)
    if target.spec is not None:
        summary["target_spec"] = target.spec
    return FitResult(flow=flow, history=loop.history, summary=summary)

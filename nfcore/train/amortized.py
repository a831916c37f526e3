"""Amortized variational inference: ``fit_target(flow, target, contexts=...)`` fits one conditional
flow ``q(theta | c)`` to a conditional target ``p(theta | c)`` over a set of contexts (observations),
so that the posterior of a new observation costs one pass through the flow instead of a new fit.

The objective is the reverse KL averaged over the contexts, ``E_c KL(q(. | c) || p(. | c))``: each
step draws ``context_batch`` contexts from the training set and ``batch_size / context_batch``
reparametrised samples for each. Some contexts are held out, and the diagnostics of
``nfcore.train.diagnostics`` (Pareto k̂, ESS fraction, tails, verdict) are computed for each of
them, then summarized: k̂'s median and maximum, the share of contexts whose verdict is ``ok``, and
an overall verdict.

**Start.** The unconditional fit starts from a Pathfinder Gaussian of its target. Here there is
one posterior per context, so the start is a Gaussian that covers the *typical* posterior: Pathfinder
at a few training contexts (``start_contexts``, 4 by default), pooled as the mixture of their
Gaussians would be, mean = the average of their means and covariance = the average of their
covariances plus the (diagonal) spread of their means. The data-side layers (``standardize``,
``loc_scale``) are set to it and the conditioned layers to the identity, so the fit starts, for
every context, as that one Gaussian: at the right scale and correlations (what the data-side
layers can express and what keeps splines inside their interval), and wide enough to cover each
context's posterior, from where the conditioned layers learn how the posterior moves with the
context. A context embedding's input standardization is set from the training contexts.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import TargetError
from ..flow import Flow
from ..targets import Target
from .diagnostics import as_float64, evaluate_target
from .loop import FitResult, Loop, Progress, finite_or_none, generator
from .losses import ReverseKL
from .start import GaussianStart, gaussian_samples, pathfinder

__all__ = ["fit_amortized", "summarize_contexts", "split_contexts"]

#: At most this many held-out contexts are diagnosed.
DIAGNOSTIC_CONTEXTS = 32
#: Fewest samples per diagnosed context.
MIN_SAMPLES_PER_CONTEXT = 1000
#: The overall verdict is ``ok`` when at least this share of the diagnosed contexts is ``ok`` and
#: none is ``unreliable``; ``unreliable`` when more than ``1 - OK_SHARE`` of them are.
OK_SHARE = 0.9
_PSEUDO_DATA = 4096


def split_contexts(contexts: Tensor, holdout: float, seed: int) -> tuple[Tensor, Tensor, bool]:
    """``(train, diagnose, held_out)``: a seeded shuffle, then ``round(holdout * M)`` contexts held
    out (none when ``M < 10`` or ``holdout == 0``: then up to ``DIAGNOSTIC_CONTEXTS`` training
    contexts are diagnosed, and ``held_out`` is False)."""
    m = contexts.shape[0]
    order = torch.randperm(m, generator=generator(seed, 6))
    n_hold = int(round(holdout * m)) if m >= 10 else 0
    if n_hold == 0:
        return contexts[order], contexts[order[:DIAGNOSTIC_CONTEXTS]], False
    return contexts[order[n_hold:]], contexts[order[:n_hold][:DIAGNOSTIC_CONTEXTS]], True


def pooled_start(target: Target, contexts: Tensor, seed: int, max_seconds: float
                 ) -> GaussianStart | None:
    """The Gaussian matching the mixture of Pathfinder's approximations at ``contexts`` in its
    mean and (diagonal-spread) covariance; ``None`` when every one of them prefers ``N(0, I)``
    (or none is found)."""
    found = []
    began = time.monotonic()
    for i, row in enumerate(contexts):
        left = max_seconds - (time.monotonic() - began)
        if left <= 0 and found:
            break
        start = pathfinder(target.at(row[None]), seed=seed + i,
                           max_seconds=max(left / (len(contexts) - i), 1e-3))
        if start is not None and not start.info["identity"]:
            found.append(start)
    if not found:
        return None
    means = torch.stack([s.mean for s in found])
    cov = torch.stack([s.factor @ s.factor.T for s in found]).mean(0)
    if len(found) > 1:
        cov = cov + torch.diag(means.var(0))
    factor = torch.linalg.cholesky(cov + 1e-12 * cov.diag().max() * torch.eye(cov.shape[0],
                                                                                 dtype=cov.dtype))
    info = {"method": "pathfinder", "pooled": len(found), "tried": len(contexts),
            "seconds": round(time.monotonic() - began, 3), "identity": False}
    return GaussianStart(mean=means.mean(0), factor=factor,
                         elbo=statistics.fmean(s.elbo for s in found), mode_log_prob=None,
                         info=info)


def summarize_contexts(reports: list[dict[str, Any]], contexts: Tensor, held_out: bool
                       ) -> dict[str, Any]:
    """Per-context diagnostics (``evaluate_target``'s ``diagnostics``) summarized in the shape of
    a single fit's: ``pareto_k`` is the largest k̂ over the contexts and ``ess_fraction`` the
    smallest (the worst context's), with ``pareto_k_median`` and ``ess_fraction_median`` beside
    them; the count of each verdict, the share ``ok``, an overall verdict with its reasons, the
    worst context and each context's figures."""
    diags = [r["diagnostics"] for r in reports]
    ks = [d["pareto_k"] if d["pareto_k"] is not None else math.inf for d in diags]
    ess = [d["ess_fraction"] for d in diags]
    counts = {v: sum(d["verdict"] == v for d in diags) for v in ("ok", "check", "unreliable")}
    n = len(diags)
    share = counts["ok"] / n
    reasons: list[str] = []
    if share >= OK_SHARE and not counts["unreliable"]:
        overall = "ok"
    else:
        overall = ("unreliable" if counts["unreliable"] / n > round(1 - OK_SHARE, 9)
                   else "check")
        reasons.append(f"{counts['ok']} of {n} {'held-out ' if held_out else ''}contexts are "
                       f"'ok' ({share:.0%}; 'ok' overall needs {OK_SHARE:.0%} and none "
                       f"'unreliable'), {counts['check']} 'check', {counts['unreliable']} "
                       "'unreliable'")
    rank = {"ok": 0, "check": 1, "unreliable": 2}
    worst = max(range(n), key=lambda i: (rank[diags[i]["verdict"]], ks[i]))
    if overall != "ok":
        reasons += [f"worst context (#{worst}): {r}" for r in diags[worst]["reasons"]]

    def fin(v: float) -> float | None:
        return finite_or_none(round(v, 6)) if math.isfinite(v) else None

    return {
        "contexts": n,
        "held_out": held_out,
        # the worst context's, in the shape of a single fit's diagnostics; medians beside them
        "pareto_k": fin(max(ks)),
        "pareto_k_median": fin(statistics.median(ks)),
        "ess_fraction": round(min(ess), 6),
        "ess_fraction_median": round(statistics.median(ess), 6),
        "verdicts": counts,
        "ok_share": round(share, 6),
        "verdict": overall,
        "reasons": reasons,
        "worst": {"index": worst, "context": [round(float(v), 6) for v in contexts[worst][:64]],
                  **diags[worst]},
        "per_context": [{"pareto_k": d["pareto_k"], "ess_fraction": d["ess_fraction"],
                         "moment_shift": d.get("moment_shift"), "verdict": d["verdict"]}
                        for d in diags],
    }


@torch.no_grad()
def evaluate_contexts(flow: Flow, target: Target, contexts: Tensor, n: int, seed: int,
                      held_out: bool = True) -> dict[str, Any]:
    """``evaluate_target`` at each context row (``n`` samples in all, at least
    ``MIN_SAMPLES_PER_CONTEXT`` each), summarized by ``summarize_contexts``; also the mean ELBO
    and the median ESS fraction, as ``elbo`` and ``ess_fraction``."""
    twin = as_float64(flow)
    per = max(n // contexts.shape[0], MIN_SAMPLES_PER_CONTEXT)
    reports = [evaluate_target(twin, target, per, seed + i, context=row[None])
               for i, row in enumerate(contexts)]
    summary = summarize_contexts(reports, contexts, held_out)
    elbos = [r["elbo"] for r in reports]
    return {"elbo": statistics.fmean(elbos) if all(map(math.isfinite, elbos)) else None,
            "ess_fraction": summary["ess_fraction_median"], "ess_samples": per,
            "diagnostics": summary}


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.double().contiguous().cpu().numpy().tobytes()).hexdigest()


def fit_amortized(
    flow: Flow, target: Target, contexts: Tensor, *, total: int | None,
    max_seconds: float | None, batch_size: int, context_batch: int | None, holdout: float,
    start: str, start_contexts: int, lr: float, weight_decay: float, schedule: str,
    clip_grad_norm: float | None, anneal_steps: int, seed: int,
    callback: Callable[[Progress], Any] | None, should_stop: Callable[[], bool] | None,
    checkpoint_path: str | None, checkpoint_every_s: float, resume: bool, ess_samples: int,
    every: int, gradient: str, beta: Callable[[int], float], began: float,
) -> FitResult:
    """The amortized branch of ``fit_target`` (arguments checked there; see the module
    docstring)."""
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 <= holdout <= 0.5:
        raise ValueError(f"Expected holdout in [0, 0.5]; got {holdout!r}")
    if (isinstance(start_contexts, bool) or not isinstance(start_contexts, int)
            or start_contexts < 1):
        raise ValueError(f"Expected start_contexts to be a positive integer; got "
                         f"{start_contexts!r}")
    train, diagnose, held_out = split_contexts(contexts, holdout, seed)
    m = train.shape[0]
    k = min(m, batch_size, 32) if context_batch is None else context_batch
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= batch_size:
        raise ValueError(f"Expected context_batch to be an integer in [1, batch_size]; got {k!r}")
    per = max(batch_size // k, 1)
    device, dtype = flow.device, flow.dtype
    train_dev = train.to(device=device, dtype=dtype)
    flow.initialize_context(train_dev)

    gaussian = None
    if start == "pathfinder":
        limit = 60.0 if max_seconds is None else min(60.0, 0.25 * max_seconds)
        gaussian = pooled_start(target, train[:start_contexts], seed, limit)
        if gaussian is not None:
            for layer in flow.layers:
                layer.reset_identity()
            x = gaussian_samples(gaussian, max(_PSEUDO_DATA, 4 * flow.dim), seed)
            pick = torch.randint(m, (x.shape[0],), generator=generator(seed, 7))
            flow.initialize(x, train_dev[pick], knots=False)
            # ``initialize`` set the embedding's standardization from these draws; all contexts:
            flow.initialize_context(train_dev)
    n_eval = ess_samples
    reserve = 0.0
    if max_seconds is not None:
        evaluate_target(flow, target, 64, seed, context=diagnose[:1])
        tick = time.monotonic()
        evaluate_target(flow, target, MIN_SAMPLES_PER_CONTEXT, seed, context=diagnose[:1])
        per_ctx = max(n_eval // diagnose.shape[0], MIN_SAMPLES_PER_CONTEXT)
        reserve = ((time.monotonic() - tick) * per_ctx / MIN_SAMPLES_PER_CONTEXT
                   * diagnose.shape[0])
    spent = time.monotonic() - began + reserve
    loop = Loop(flow, steps=total, lr=lr, weight_decay=weight_decay, schedule=schedule,
                clip_grad_norm=clip_grad_norm,
                max_seconds=None if max_seconds is None else max(max_seconds - spent, 1e-3),
                callback=callback, should_stop=should_stop, checkpoint_path=checkpoint_path,
                checkpoint_every_s=checkpoint_every_s, resume=resume, record_every=every,
                seed=seed, batch_size=batch_size,
                fingerprint={"objective": "amortized", "spec": flow.spec, "target": target.name,
                             "target_spec": target.spec, "target_text": target.description,
                             "dim": target.dim, "contexts": _digest(contexts),
                             "total": total, "batch": batch_size, "context_batch": k,
                             "holdout": holdout, "lr": lr, "wd": weight_decay,
                             "schedule": schedule, "clip": clip_grad_norm, "anneal": anneal_steps,
                             "seed": seed, "max_seconds": max_seconds, "every": every,
                             "gradient": gradient, "start": start,
                             "start_contexts": start_contexts})
    loss_fn = ReverseKL(target, path=gradient == "path")

    def step(i: int) -> Tensor:
        g = generator(seed, 2, i)
        pick = torch.randint(m, (k,), generator=g).to(device)
        c = train_dev[pick].repeat_interleave(per, 0)
        eps = torch.randn(k * per, flow.dim, generator=g, dtype=dtype).to(device)
        return loss_fn(flow, eps, beta(i), context=c)[0]

    loop.run(step, annotate=lambda i: {"beta": beta(i)})
    metrics = evaluate_contexts(flow, target, diagnose, n_eval, seed, held_out)
    summary = loop.summary(
        objective="variational",
        amortized=True,
        target=target.name,
        dim=target.dim,
        context_dim=target.context_dim,
        contexts={"train": m, "diagnosed": int(diagnose.shape[0]), "held_out": held_out,
                  "per_step": k, "samples_per_context": per},
        **{key: finite_or_none(v) if isinstance(v, float) else v for key, v in metrics.items()},
        anneal_steps=anneal_steps,
        gradient=gradient,
        start=None if gaussian is None else gaussian.info,
    )
    summary["max_seconds"] = max_seconds
    summary["wall_s"] = round(time.monotonic() - began, 3)
    if target.spec is not None:
        summary["target_spec"] = target.spec
    return FitResult(flow=flow, history=loop.history, summary=summary)


def check_amortized(flow: Flow, target: Target, contexts: Any) -> Tensor | None:
    """The contexts of a fit as float64 rows, or None for an unconditional fit; raises
    ``TargetError`` when the flow, the target and ``contexts`` do not go together."""
    if contexts is None:
        if target.context_dim:
            raise TargetError(f"Target {target.name!r} is conditional (a context row of "
                              f"{target.context_dim} numbers: {target.context_columns[:4]}...): "
                              "give contexts=... for an amortized fit with a conditional flow, "
                              "or fit target.at(context) for one observation")
        if flow.context_dim:
            raise TargetError("fit_target needs an unconditional flow for an unconditional target; "
                              "this one takes a context")
        return None
    if not target.context_dim:
        raise TargetError(f"Target {target.name!r} takes no context; contexts are only for "
                          "conditional targets (a model with a 'context' block)")
    if flow.context_dim != target.context_dim:
        raise TargetError(f"Target {target.name!r} has context rows of {target.context_dim} "
                          f"numbers; the flow's context_dim is {flow.context_dim}")
    c = target.check_context(contexts)
    return c.cpu()

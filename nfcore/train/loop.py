"""What both training loops share: the optimizer and learning-rate schedule, gradient clipping,
the wall-clock limit, progress reports, cancellation, checkpoints and per-step seeding.

Randomness is a pure function of ``(seed, stream, index)``: each step and each epoch draws from its
own freshly seeded generator. A checkpoint therefore needs no RNG state, and a run resumed from one
takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import NFCoreError, TrainingCancelled
from ..flow import Flow
from .checkpoint import clone_state, load_checkpoint, save_checkpoint

__all__ = ["Progress", "FitResult", "TrainingDiverged", "Loop", "generator", "learning_rate", "SCHEDULES",
           "DEFAULT_STEPS", "resolve_steps", "check_common"]

SCHEDULES = ("cosine", "linear", "constant")

#: The step budget when a fit is given neither a step count (or epochs) nor a time budget. With a
#: time budget alone, a fit trains until the budget or early stopping; with both, whichever comes
#: first. ``fit_density``, ``fit_target``, ``POST /train`` and ``nfserve train`` all follow this.
DEFAULT_STEPS = {"density": 2000, "variational": 5000}
_MAX_BAD_STEPS = 50


class TrainingDiverged(NFCoreError, ValueError):
    """The loss stayed NaN or infinite for many steps in a row (a bad target or learning rate)."""


@dataclass
class Progress:
    """A progress report: ``loss`` is the mean training loss since the previous report."""

    step: int
    #: The step budget, or None on a time budget alone (then ``eta`` follows the clock).
    total: int | None
    loss: float | None
    val_loss: float | None
    elapsed: float
    eta: float | None


@dataclass
class FitResult:
    """The trained ``flow`` (best weights), its ``history`` (one dict per report) and a
    JSON-serializable ``summary`` to store in the artifact's metadata."""

    flow: Flow
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, stream, index)``."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _positive(name: str, v: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(v, kind) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
    if not ok or (not integer and not math.isfinite(v)):
        what = "integer" if integer else "number"
        raise ValueError(f"Expected {name} to be a {'non-negative' if allow_zero else 'positive'} "
                         f"{what}; got {v!r}")


def learning_rate(step: int, total: int | None, lr: float, *, elapsed: float = 0.0,
                  max_seconds: float | None = None, schedule: str = "cosine") -> float:
    """Linear warm-up over ``min(100, total // 20)`` steps (on a time budget alone, over 100 steps
    or 5 % of the time, whichever is shorter), then ``schedule`` over whichever of steps and wall
    clock is further on: on a time budget alone the schedule follows the clock, so a cosine decays
    over the time given. Public so benchmarks give peers the very same recipe."""
    if total is None:
        warm = (step + 1) / 100
        if max_seconds is not None:
            warm = max(warm, elapsed / (0.05 * max_seconds))
        if warm < 1.0:
            return lr * warm
    elif step < (warmup := min(100, total // 20)):
        return lr * (step + 1) / warmup
    p = 0.0 if total is None else step / max(total, 1)
    if max_seconds is not None:
        p = max(p, elapsed / max_seconds)
    p = min(p, 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr * (1.0 - p)
    return lr


def resolve_steps(steps: int | None, max_seconds: float | None, objective: str) -> int | None:
    """The step budget of a run given ``steps`` and ``max_seconds``: the steps when given, none
    (train until the time budget or early stopping) for a time budget alone, and
    ``DEFAULT_STEPS[objective]`` when neither is given."""
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Expected steps to be a positive integer; got {steps!r}")
        return steps
    return None if max_seconds is not None else DEFAULT_STEPS[objective]


def check_common(*, batch_size: int, lr: float, schedule: str, clip_grad_norm: float | None,
                 max_seconds: float | None, seed: int, checkpoint_every_s: float,
                 weight_decay: float = 0.0) -> None:
    """Argument checks shared by both public loops; raise ``ValueError("Expected …; got …")``."""
    _positive("batch_size", batch_size, integer=True)
    _positive("lr", lr)
    _positive("weight_decay", weight_decay, allow_zero=True)
    if schedule not in SCHEDULES:
        raise ValueError(f"Expected schedule in {list(SCHEDULES)}; got {schedule!r}")
    if clip_grad_norm is not None:
        _positive("clip_grad_norm", clip_grad_norm)
    if max_seconds is not None:
        _positive("max_seconds", max_seconds)
    _positive("seed", seed, integer=True, allow_zero=True)
    _positive("checkpoint_every_s", checkpoint_every_s, allow_zero=True)


class Loop:
    """The bookkeeping every fit shares, so that ``fit_density`` and ``fit_target`` hold only their
    objective: the optimizer and schedule, clipping, the step and time budgets, the history,
    progress reports, cancellation, checkpoints and resumption, validation with early stopping and
    the best weights, and the common part of the summary.

    The objective supplies ``step(i) -> loss`` (and, for early stopping, ``validate() -> loss``) to
    ``run``. ``extra`` holds an objective's own resumable JSON state, ``extra_tensors`` its tensors.

    Budgets: ``steps`` alone trains exactly that many steps, ``max_seconds`` alone trains until the
    time is up, both stop at whichever comes first; early stopping (with ``validate`` and
    ``patience``) can end any of them sooner.
    """

    def __init__(
        self,
        flow: Flow,
        *,
        steps: int | None,
        lr: float,
        weight_decay: float,
        schedule: str,
        clip_grad_norm: float | None,
        max_seconds: float | None,
        callback: Callable[[Progress], Any] | None,
        should_stop: Callable[[], bool] | None,
        checkpoint_path: str | None,
        checkpoint_every_s: float,
        resume: bool,
        fingerprint: dict[str, Any],
        record_every: int,
        seed: int,
        batch_size: int,
        patience: int | None = None,
        progress_every_s: float = 1.0,
    ):
        if steps is None and max_seconds is None:
            raise ValueError("Expected a step budget, a time budget or both; got neither")
        # The clock starts here, not after the optimizer is built: a process's first AdamW costs
        # about 1.4 s (torch's lazy imports), which a 10 s budget would otherwise overrun by.
        began = time.monotonic()
        self.started = time.time()
        self.flow = flow
        self.total = steps
        self.base_lr = lr
        self.schedule = schedule
        self.clip = clip_grad_norm
        self.max_seconds = max_seconds
        self.callback = callback
        self.should_stop = should_stop
        self.path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.every = checkpoint_every_s
        self.record_every = record_every
        self.seed = seed
        self.batch_size = batch_size
        self.patience = patience
        self.progress_every = progress_every_s
        self.params = [p for p in flow.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.extra_tensors: dict[str, Tensor] = {}
        self.bad_steps = 0
        self.resumed_from: int | None = None
        self.stopped_reason: str | None = None
        self._elapsed_before = 0.0
        self._start = began
        self._last_checkpoint = self._start
        self._last_report = -math.inf
        self.lr = lr
        if self.path is not None and resume and self.path.exists():
            self._resume()
        for key, value in (("loss_sum", 0.0), ("loss_count", 0), ("best_val", None),
                           ("best_step", 0), ("bad_checks", 0)):
            self.extra.setdefault(key, value)

    # ------------------------------------------------------------------ time and schedule
    @property
    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._start

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.elapsed >= self.max_seconds

    def learning_rate(self) -> float:
        """The learning rate of the current step (see the module-level ``learning_rate``)."""
        return learning_rate(self.step, self.total, self.base_lr, elapsed=self.elapsed,
                             max_seconds=self.max_seconds, schedule=self.schedule)

    def stop_reason(self) -> str | None:
        if self.total is not None and self.step >= self.total:
            return "completed"
        if self.out_of_time():
            return "max_seconds"
        if self.patience is not None and self.extra["bad_checks"] >= self.patience:
            return "early_stopping"
        return None

    # ------------------------------------------------------------------ the run
    def run(self, step: Callable[[int], Tensor], *, validate: Callable[[], float] | None = None,
            annotate: Callable[[int], dict[str, Any]] | None = None) -> str:
        """Train until a budget or early stopping ends the run; returns why it stopped.

        ``step(i)`` returns the loss of step ``i`` (the loop backpropagates it and steps the
        optimizer). Every ``record_every`` steps, and at the end, the mean training loss since the
        last record goes into the history with ``validate()``'s loss and ``annotate(i)``'s fields.
        With ``validate``, the weights of the best validation loss are kept, restored at the end,
        and ``patience`` records without improvement stop the run.
        """
        if validate is not None and not any(k.startswith("best.") for k in self.extra_tensors):
            self._keep_best()
        extra = self.extra
        self.flow.train()
        try:
            while (reason := self.stop_reason()) is None:
                self.check_cancel()
                loss = step(self.step)
                if self.update(loss):
                    extra["loss_sum"] += float(loss.detach())
                    extra["loss_count"] += 1
                end = self.total is not None and self.step >= self.total
                if self.step % self.record_every == 0 or end or self.out_of_time():
                    self._record(validate, annotate)
                else:
                    self.report(float(loss.detach()), None)
                self.maybe_checkpoint()
            if extra["loss_count"]:  # a time budget can end the run between two records
                self._record(validate, annotate)
            self.maybe_checkpoint(force=True)
        finally:
            self.flow.train(False)
        if validate is not None:
            self.flow.load_state_dict({k.split(".", 1)[1]: v
                                       for k, v in self.extra_tensors.items()})
        self.stopped_reason = reason
        return reason

    def _keep_best(self) -> None:
        self.extra_tensors = {f"best.{k}": v for k, v in clone_state(self.flow).items()}

    def _record(self, validate: Callable[[], float] | None,
                annotate: Callable[[int], dict[str, Any]] | None) -> None:
        extra = self.extra
        mean = extra["loss_sum"] / extra["loss_count"] if extra["loss_count"] else None
        extra["loss_sum"], extra["loss_count"] = 0.0, 0
        val = None
        if validate is not None:
            self.flow.train(False)
            val = validate()
            self.flow.train()
            if extra["best_val"] is None or val < extra["best_val"]:
                extra.update(best_val=val, best_step=self.step, bad_checks=0)
                self._keep_best()
            else:
                extra["bad_checks"] += 1
        self.record(loss=mean, val_loss=val, **(annotate(self.step - 1) if annotate else {}))

    # ------------------------------------------------------------------ one step
    def check_cancel(self) -> None:
        if self.should_stop is not None and self.should_stop():
            budget = "" if self.total is None else f" of {self.total}"
            raise TrainingCancelled(f"Training cancelled at step {self.step}{budget}")

    def update(self, loss: Tensor) -> bool:
        """Backpropagate ``loss`` and take one optimizer step; skip (and return False) if it is not
        finite. Raises ``TrainingDiverged`` after many non-finite steps in a row."""
        self.lr = self.learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        ok = bool(torch.isfinite(loss))
        if ok:
            loss.backward()
            if self.clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
                ok = bool(torch.isfinite(norm))
        if ok:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= _MAX_BAD_STEPS:
                raise TrainingDiverged(f"The loss or its gradient was NaN or infinite for "
                                       f"{_MAX_BAD_STEPS} steps in a row (step {self.step})")
        self.step += 1
        return ok

    # ------------------------------------------------------------------ reports
    def eta(self) -> float | None:
        left = None if self.max_seconds is None else max(self.max_seconds - self.elapsed, 0.0)
        done = self.step - (self.resumed_from or 0)
        if self.total is None or done <= 0:
            return left
        run = self.elapsed - self._elapsed_before
        eta = run / done * (self.total - self.step)
        return eta if left is None else min(eta, left)

    def record(self, **values: Any) -> None:
        """Append a history entry (with step, lr and elapsed) and report it."""
        entry = {"step": self.step, "lr": self.lr, "elapsed": round(self.elapsed, 4)}
        entry.update({k: finite_or_none(v) if isinstance(v, float) else v
                      for k, v in values.items()})
        self.history.append(entry)
        self.report(entry.get("loss"), entry.get("val_loss"), force=True)

    def report(self, loss: float | None, val_loss: float | None, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self._last_report < self.progress_every:
            return
        self._last_report = now
        self.callback(Progress(step=self.step, total=self.total, loss=finite_or_none(loss),
                               val_loss=finite_or_none(val_loss), elapsed=self.elapsed,
                               eta=self.eta()))

    def summary(self, **fields: Any) -> dict[str, Any]:
        """The objective's ``fields`` followed by what every run reports: the last training loss,
        the steps taken and the budgets, the optimizer settings, the seed, timings, where it
        resumed from and why it stopped."""
        last = self.history[-1] if self.history else {}
        return {
            **fields,
            "loss": fields.get("loss", last.get("loss")),
            "steps": self.step,
            "total_steps": self.total,
            "max_seconds": self.max_seconds,
            "batch_size": self.batch_size,
            "lr": self.base_lr,
            "schedule": self.schedule,
            "seed": self.seed,
            "duration_s": round(self.elapsed, 3),
            "resumed_from_step": self.resumed_from,
            "stopped_reason": self.stopped_reason,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": round(time.time() - self.started, 3),
        }

    # ------------------------------------------------------------------ checkpoints
    def maybe_checkpoint(self, *, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.every:
            return
        state = {"fingerprint": self.fingerprint, "step": self.step, "elapsed": self.elapsed,
                 "history": self.history, "extra": self.extra, "bad_steps": self.bad_steps}
        save_checkpoint(self.path, model=self.flow.state_dict(),
                        optimizer=self.optimizer.state_dict(), tensors=self.extra_tensors,
                        state=state)
        self._last_checkpoint = time.monotonic()

    def _resume(self) -> None:
        saved = load_checkpoint(self.path)
        state = saved["state"]
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"Checkpoint {str(self.path)!r} was written by a different run (its "
                             "spec, data or options differ); delete it or pass resume=False")
        self.flow.load_state_dict(saved["model"], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        device = self.flow.device
        self.extra_tensors = {k: v.to(device) for k, v in saved["tensors"].items()}
        self.step = int(state["step"])
        self.resumed_from = self.step
        self._elapsed_before = float(state["elapsed"])
        self.history = list(state["history"])
        self.extra = dict(state["extra"])
        self.bad_steps = int(state.get("bad_steps", 0))

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
from .checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Progress", "FitResult", "TrainingDiverged", "Loop", "generator", "learning_rate", "SCHEDULES",
           "DEFAULT_STEPS"]

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
    total: int
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


def learning_rate(step: int, total: int, lr: float, *, elapsed: float = 0.0,
                  max_seconds: float | None = None, schedule: str = "cosine") -> float:
    """Linear warm-up over ``min(100, total // 20)`` steps, then ``schedule`` over whichever of
    steps and wall clock is further on. Public so benchmarks give peers the very same recipe."""
    warmup = min(100, total // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    p = step / max(total, 1)
    if max_seconds is not None:
        p = max(p, elapsed / max_seconds)
    p = min(p, 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr * (1.0 - p)
    return lr


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
    """Optimizer, schedule, clipping, timing, reports, cancellation and checkpoints for one run.

    The caller owns the step: it computes a loss and calls ``update(loss)``; ``extra`` holds the
    caller's own resumable state (JSON) and ``extra_tensors`` its tensors (e.g. the best weights).
    """

    def __init__(
        self,
        flow: Flow,
        *,
        total: int,
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
        progress_every_s: float = 1.0,
    ):
        self.flow = flow
        self.total = total
        self.base_lr = lr
        self.schedule = schedule
        self.clip = clip_grad_norm
        self.max_seconds = max_seconds
        self.callback = callback
        self.should_stop = should_stop
        self.path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.every = checkpoint_every_s
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
        self._elapsed_before = 0.0
        self._start = time.monotonic()
        self._last_checkpoint = self._start
        self._last_report = -math.inf
        self.lr = lr
        if self.path is not None and resume and self.path.exists():
            self._resume()

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

    # ------------------------------------------------------------------ one step
    def check_cancel(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(f"Training cancelled at step {self.step} of {self.total}")

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
        done = self.step - (self.resumed_from or 0)
        if done <= 0:
            return None
        run = self.elapsed - self._elapsed_before
        eta = run / done * (self.total - self.step)
        if self.max_seconds is not None:
            eta = min(eta, max(self.max_seconds - self.elapsed, 0.0))
        return eta

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

    def stop_reason(self) -> str | None:
        if self.step >= self.total:
            return "completed"
        if self.out_of_time():
            return "max_seconds"
        return None

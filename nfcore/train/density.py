"""``fit_density``: maximum likelihood on data, with a validation split and early stopping."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeError
from ..flow import Flow
from .density_diagnostics import MAX_ROWS, evaluate_density
from .flow_matching import density_loss
from .loop import FitResult, Loop, Progress, check_common, finite_or_none, generator, resolve_steps

__all__ = ["fit_density", "split"]

_EVAL_CHUNK = 8192


def _as_tensor(flow: Flow, name: str, value: Any, width: int) -> Tensor:
    try:
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"Expected {name} as a numeric array; got {type(value).__name__} ({e})") from None
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ShapeError(f"Expected {name} to be real-valued; got dtype {t.dtype}")
    if t.ndim == 1 and width == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[1] != width:
        raise ShapeError(f"Expected {name} of shape (N, {width}); got {tuple(t.shape)}")
    t = t.to(device=flow.device, dtype=flow.dtype)
    if not torch.isfinite(t).all():
        raise ShapeError(f"Expected finite {name}; it holds NaN or infinite values")
    return t


def _refuse_lost_precision(flow: Flow, data: Any, constant: list[int]) -> None:
    """Raise if a column that is constant in the flow's dtype was not constant as given: a spread
    too small for that dtype's resolution at the column's magnitude (1e9 + N(0, 1) in float32,
    whose steps there are 64), which is no constant to drop."""
    given = data if isinstance(data, Tensor) else torch.as_tensor(np.asarray(data))
    given = given.detach().to("cpu", torch.float64).reshape(given.shape[0], -1)
    for column in constant:
        low, high = float(given[:, column].min()), float(given[:, column].max())
        if low != high:
            dtype = str(flow.dtype).removeprefix("torch.")
            step = torch.finfo(flow.dtype).eps * max(abs(low), abs(high))
            raise ShapeError(
                f"data column {column} varies from {low!r} to {high!r}, but {dtype} resolves only "
                f"steps of about {step:.3g} at that magnitude, so every value rounds to one: "
                'build the flow with "dtype": "float64", or subtract the offset first')


def _digest(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def split(n: int, validation_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The ``(train, validation)`` row indices ``fit_density`` uses for ``n`` rows."""
    n_val = 0 if validation_fraction == 0 else min(max(1, round(n * validation_fraction)), n - 1)
    order = torch.randperm(n, generator=generator(seed, 0))
    return order[n_val:], order[:n_val]


@torch.no_grad()
def _mean_nll(flow: Flow, x: Tensor, context: Tensor | None) -> float:
    total = 0.0
    for i in range(0, x.shape[0], _EVAL_CHUNK):
        c = None if context is None else context[i : i + _EVAL_CHUNK]
        z, ladj = flow.transform(x[i : i + _EVAL_CHUNK], c)
        total += float((flow.base_log_prob(z) + ladj).double().sum())
    return -total / x.shape[0]


@torch.no_grad()
def _diagnostics_seconds(flow: Flow, x_train: Tensor, c_train: Tensor | None, rows: int) -> float:
    """About what ``evaluate_density`` will take on ``rows`` scored rows: two passes (those, and
    as many training rows) over at most its row cap, timed on a small batch after one to warm
    up."""
    cap = MAX_ROWS if flow.cost["log_prob"] == "one pass" else MAX_ROWS // 5
    probe = min(256, x_train.shape[0])
    c = None if c_train is None else c_train[:probe]
    was_training = flow.training
    flow.train(False)
    flow.log_prob(x_train[:probe], c)
    tick = time.monotonic()
    flow.log_prob(x_train[:probe], c)
    seconds = time.monotonic() - tick
    flow.train(was_training)
    return seconds * 2 * min(rows, cap) / probe


def fit_density(
    flow: Flow,
    data: Any,
    *,
    context: Any = None,
    steps: int | None = None,
    epochs: int | None = None,
    max_seconds: float | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    clip_grad_norm: float | None = 5.0,
    validation_fraction: float = 0.1,
    patience: int | None = 20,
    validate_every: int | None = None,
    seed: int = 0,
    callback: Callable[[Progress], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_path: str | None = None,
    checkpoint_every_s: float = 5.0,
    resume: bool = True,
    init_knots: bool = True,
    loss: Any = None,
) -> FitResult:
    """Fit ``flow`` to ``data`` (shape ``(N, dim)``) by maximum likelihood, or a CNF by flow
    matching, in place.

    The data are split (by ``seed``) into training and validation rows; ``flow.initialize`` fits the
    data-dependent layers to the training rows first (``standardize`` to their mean and scale, so
    ``log_prob`` stays in data units and any scale or offset is reached; ``loc_scale`` to their
    correlations; ``actnorm``), and (with ``init_knots``) starts each spline layer from knots that
    map the marginals of its input close to a standard normal, with no dependence on the other
    features yet (``layers.spline_start`` says why), and each residual layer's
    activations from bends placed in its input's range.
    The validation loss is computed every ``validate_every`` steps (default: once per epoch, but
    every 20 to 100 steps); after ``patience`` checks without improvement training stops, and the best
    weights are restored at the end. With ``validation_fraction=0`` there is no early stopping.

    Budgets: ``steps`` (or ``epochs``) alone trains that many steps; ``max_seconds`` alone trains
    until the time is up, with the learning-rate schedule following the clock; both stop at
    whichever comes first; neither gives ``DEFAULT_STEPS["density"]`` steps. Early stopping can end
    any of them sooner.

    Arguments:
        flow: the flow to train (its current weights are the starting point, but for the layers
            that ``flow.initialize`` sets from the data).
        data: array-like of shape ``(N, dim)``.
        context: array-like of shape ``(N, context_dim)`` for a conditional flow.
        steps, epochs: the step budget (at most one of them).
        max_seconds: the wall-clock budget of the whole call (the data-side layers' fit and the
            closing diagnostics included). With a step budget too, the schedule follows whichever
            of steps and time is further along, so a time-limited run still ends annealed (and
            depends on timing).
        batch_size, lr, weight_decay: AdamW settings; ``schedule`` is ``cosine``, ``linear`` or
            ``constant`` after a short linear warm-up; ``clip_grad_norm`` clips the gradient norm.
        seed: the split, the batch order and hence, from the same starting weights, the result.
        callback: gets a ``Progress`` at each validation and at most once a second in between.
        should_stop: checked before every step; when it returns True, ``TrainingCancelled`` is
            raised and nothing is written.
        checkpoint_path: a ``.safetensors`` file written atomically every ``checkpoint_every_s``
            seconds and at the end; with ``resume=True`` an existing one is continued.
        init_knots: set the spline layers' knots (and the residual layers' activation bends)
            from the data before training (see
            ``Flow.initialize``); False keeps the flow's own, e.g. to go on from a trained flow.
        loss: ``"likelihood"`` (maximum likelihood), ``"flow_matching"`` (for a flow ending in a
            ``cnf`` layer; see ``nfcore.train.FlowMatching``, whose instances are accepted too)
            or ``None``: flow matching for such a flow (one ``cnf`` layer, last), maximum
            likelihood otherwise. The
            validation loss is the held-out negative log-likelihood either way.

    Returns:
        A ``FitResult``; ``summary["val_loss"]`` is the best validation mean negative log-likelihood.

    Example:
        >>> import nfcore, torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> flow = nfcore.build({"preset": "nsf", "dim": 2, "transforms": 2, "hidden": [16]})
        >>> result = nfcore.fit_density(flow, torch.randn(500, 2) * 3 + 1, steps=50)
        >>> result.summary["steps"], result.summary["stopped_reason"]
        (50, 'completed')
    """
    began = time.monotonic()
    check_common(batch_size=batch_size, lr=lr, schedule=schedule, clip_grad_norm=clip_grad_norm,
                 max_seconds=max_seconds, seed=seed, checkpoint_every_s=checkpoint_every_s,
                 weight_decay=weight_decay)
    if not isinstance(flow, Flow):
        raise TypeError(f"Expected an nfcore Flow; got {type(flow).__name__}")
    x = _as_tensor(flow, "data", data, flow.dim)
    ctx = None
    if flow.context_dim:
        if context is None:
            raise ShapeError(f"This flow needs a context of shape (N, {flow.context_dim})")
        ctx = _as_tensor(flow, "context", context, flow.context_dim)
        if ctx.shape[0] != x.shape[0]:
            raise ShapeError(f"Expected {x.shape[0]} context rows; got {ctx.shape[0]}")
    elif context is not None:
        raise ShapeError("This flow takes no context; got one")
    n = x.shape[0]
    if n < 2:
        raise ShapeError(f"Expected at least 2 rows of data; got {n}")
    # A column with one value has no density (it is infinite there): every preset either diverged
    # or reported a meaningless loss on it, so it is refused up front, by name.
    constant = (x.amax(0) == x.amin(0)).nonzero().flatten().tolist()
    if constant:
        _refuse_lost_precision(flow, data, constant)
        first = constant[0]
        raise ShapeError(
            f"data column {first} is constant (every row is {float(x[0, first]):g})"
            + (f", and so are columns {constant[1:]}" if len(constant) > 1 else "")
            + ": a fixed value has no density to learn; drop it (and add it back as a constant), "
              "or send the data with its real spread")
    if not (isinstance(validation_fraction, int | float) and 0 <= validation_fraction < 1):
        raise ValueError(f"Expected validation_fraction in [0, 1); got {validation_fraction!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                 or patience < 1):
        raise ValueError(f"Expected patience to be a positive integer or None; got {patience!r}")

    train_idx, val_idx = (i.to(x.device) for i in split(n, validation_fraction, seed))
    n_val = val_idx.shape[0]
    x_train, x_val = x[train_idx], x[val_idx]
    c_train = None if ctx is None else ctx[train_idx]
    c_val = None if ctx is None else ctx[val_idx]
    n_train = x_train.shape[0]
    batch = min(batch_size, n_train)
    per_epoch = math.ceil(n_train / batch)
    if steps is not None and epochs is not None:
        raise ValueError("Expected steps or epochs, not both")
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Expected epochs to be a positive integer; got {epochs!r}")
        steps = epochs * per_epoch
    total = resolve_steps(steps, max_seconds, "density")
    every = validate_every or min(max(per_epoch, 20), 100)

    loss_fn, loss_name = density_loss(flow, loss)
    flow.initialize(x_train, c_train, knots=init_knots)
    # The budget covers the whole call: what came before the training (the split, the
    # data-side layers' fit) and the closing diagnostics, timed on a small batch and scaled.
    budget = max_seconds
    if max_seconds is not None:
        reserve = _diagnostics_seconds(flow, x_train, c_train, n_val or n_train)
        budget = max(max_seconds - (time.monotonic() - began) - reserve, 1e-3)
    loop = Loop(flow, steps=total, lr=lr, weight_decay=weight_decay, schedule=schedule,
                clip_grad_norm=clip_grad_norm, max_seconds=budget, callback=callback,
                should_stop=should_stop, checkpoint_path=checkpoint_path,
                checkpoint_every_s=checkpoint_every_s, resume=resume, record_every=every,
                seed=seed, batch_size=batch, patience=patience if n_val else None,
                fingerprint={"objective": "density", "spec": flow.spec, "data": _digest(x, ctx),
                             "total": total, "batch": batch, "lr": lr, "wd": weight_decay,
                             "schedule": schedule, "clip": clip_grad_norm, "val": n_val,
                             "every": every, "patience": patience, "seed": seed,
                             "max_seconds": max_seconds, "init_knots": init_knots,
                             "loss": loss_name})
    order: dict[int, Tensor] = {}

    def step(i: int) -> Tensor:
        epoch, j = divmod(i, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = torch.randperm(n_train, generator=generator(seed, 1, epoch)).to(x.device)
        idx = order[epoch][j * batch : (j + 1) * batch]
        return loss_fn(flow, x_train[idx], None if c_train is None else c_train[idx],
                       generator(seed, 4, i))

    loop.run(step, validate=(lambda: _mean_nll(flow, x_val, c_val)) if n_val else None)
    diagnostics = evaluate_density(flow, x_train, x_val, c_train, c_val, seed)
    summary = loop.summary(
        objective="density",
        loss_function=loss_name,
        data_shape=[n, flow.dim],
        train_rows=n_train,
        validation_rows=n_val,
        val_loss=finite_or_none(loop.extra["best_val"]),
        best_step=loop.extra["best_step"] if n_val else loop.step,
        epochs=round(loop.step / per_epoch, 3),
        diagnostics=diagnostics,
    )
    summary["max_seconds"] = max_seconds
    summary["wall_s"] = round(time.monotonic() - began, 3)
    return FitResult(flow=flow, history=loop.history, summary=summary)

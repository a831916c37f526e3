"""The target registry: built-ins plus the operator's plugins, looked up by name."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..errors import TargetError
from .base import Target
from .builtins import BUILTINS

__all__ = ["get", "register", "unregister", "names", "from_spec"]

_PLUGINS: dict[str, Callable[..., Target]] = {}
_LOCK = threading.Lock()
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}\Z")


def _key(name: str) -> str:
    return name.lower()


def _find(name: str) -> Callable[..., Target] | None:
    for table in (BUILTINS, _PLUGINS):
        for known, factory in table.items():
            if _key(known) == _key(name):
                return factory
    return None


def names() -> list[str]:
    """Every built-in and plugin target name."""
    with _LOCK:
        return [*BUILTINS, *_PLUGINS]


def get(name: str, **options: Any) -> Target:
    """The target called ``name`` (case-insensitive), e.g. ``get("U1")`` or ``get("funnel", dim=5)``.

    Raises ``TargetError`` for an unknown name or bad options.
    """
    if not isinstance(name, str):
        raise TargetError(f"Expected a target name; got {type(name).__name__}")
    with _LOCK:
        factory = _find(name)
    if factory is None:
        raise TargetError(f"Unknown target {name!r}; known targets: {', '.join(names())}")
    try:
        target = factory(**options)
    except TypeError as e:
        raise TargetError(f"Bad options for target {name!r}: {e}") from None
    if target.spec is None:
        target.spec = {"builtin": target.name, **({"options": options} if options else {})}
    return target


def from_spec(spec: Any) -> Target:
    """A target from its JSON form, as the HTTP API takes it:

    - ``{"builtin": "U1"}``, optionally with ``"options": {"dim": 5}``;
    - a model in the model language, ``{"params", "data", "log_prob", "derived"}``
      (``nfcore.targets.model``);
    - the older expression form, ``{"dim": 10, "log_prob": "...", "constants": {...}}``.

    ``Target.spec`` gives this JSON back, so ``from_spec(t.spec)`` rebuilds ``t``.

    Example:
        >>> from_spec({"builtin": "funnel", "options": {"dim": 3}}).dim
        3
        >>> from_spec({"params": {"mu": {}}, "log_prob": "normal_lpdf(mu, 0, 1)"}).columns
        ['mu']
    """
    from .expression import from_expression
    from .model import MODEL_KEYS, ModelTarget

    if not isinstance(spec, dict):
        raise TargetError(f"Expected a target object; got {type(spec).__name__}")
    if "builtin" in spec:
        extra = set(spec) - {"builtin", "options"}
        if extra:
            raise TargetError(f"target: unknown keys {sorted(extra)} next to 'builtin'")
        options = spec.get("options") or {}
        if not isinstance(options, dict):
            raise TargetError(f"target.options: expected an object; got {options!r}")
        return get(spec["builtin"], **options)
    if "params" in spec:
        return ModelTarget(spec)
    extra = set(spec) - {"dim", "log_prob", "constants"}
    if extra or "dim" not in spec or "log_prob" not in spec:
        raise TargetError("target: expected {'builtin': name}, a model "
                          f"{{{', '.join(map(repr, MODEL_KEYS))}}} or {{'dim', 'log_prob', "
                          f"'constants'}}; got keys {sorted(map(str, spec))}")
    return from_expression(spec["dim"], spec["log_prob"], spec.get("constants"))


def register(
    name: str,
    target: Target | Callable[[Tensor], Tensor],
    *,
    dim: int,
    log_z: float | None = None,
    replace: bool = False,
) -> Target:
    """Register an operator plugin: a ``Target`` or a callable ``log_prob(z) -> (N,)`` (trusted code).

    Built-in names cannot be taken; an existing plugin name needs ``replace=True``.

    Example:
        >>> import nfcore
        >>> t = nfcore.targets.register("doc_normal", lambda z: -0.5 * (z * z).sum(-1), dim=3,
        ...                             replace=True)
        >>> nfcore.targets.get("doc_normal").dim
        3
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise TargetError(f"Expected a plugin name of letters, digits, '_', '.' or '-' starting "
                          f"with a letter; got {name!r}")
    if log_z is not None and not math.isfinite(log_z):
        raise TargetError(f"Expected a finite log_z or None; got {log_z!r}")
    if isinstance(target, Target):
        if target.dim != dim:
            raise TargetError(f"Plugin {name!r}: dim={dim} but the target has dim {target.dim}")
        made = target
        if log_z is not None:
            made = Target(name, dim, target._log_prob, log_z=log_z, sampler=target._sampler,
                          description=target.description)
    elif callable(target):
        made = Target(name, dim, target, log_z=log_z, description="plugin")
    else:
        raise TargetError(f"Expected a Target or a callable; got {type(target).__name__}")
    with _LOCK:
        if any(_key(b) == _key(name) for b in BUILTINS):
            raise TargetError(f"{name!r} is a built-in target and cannot be replaced")
        existing = [k for k in _PLUGINS if _key(k) == _key(name)]
        if existing and not replace:
            raise TargetError(f"A plugin target {name!r} is already registered; pass replace=True")
        for k in existing:
            del _PLUGINS[k]

        def factory() -> Target:
            return made

        _PLUGINS[name] = factory
    return made


def unregister(name: str) -> None:
    """Remove a plugin target (a no-op when there is none)."""
    with _LOCK:
        for k in [k for k in _PLUGINS if _key(k) == _key(name)]:
            del _PLUGINS[k]

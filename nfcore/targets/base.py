"""``Target``: an unnormalized log density ``log p~(z)`` over ``R^dim`` for reverse-KL training,
and the constrained space its samples are reported in; optionally conditional on a context (an
observation that changes from one fit to the next), for amortized fits."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ShapeError, TargetError

__all__ = ["Target", "Draws"]


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


@dataclass
class Draws:
    """Samples of a fitted flow, reported in the target's constrained space.

    ``samples`` has one column per name in ``columns`` (parameters, then derived quantities);
    ``log_prob`` is the flow's log density there, ``log q(z) - log|det d(theta)/dz|``, and
    ``target_log_prob`` the model's log density at the same points. Their difference,
    ``log_weights``, is ready for self-normalised importance sampling.
    """

    columns: list[str]
    samples: Tensor
    log_prob: Tensor
    target_log_prob: Tensor

    @property
    def log_weights(self) -> Tensor:
        return self.target_log_prob - self.log_prob


class Target:
    """An unnormalized log density over ``R^dim``, batched over rows.

    A flow is fit over ``z`` in ``R^dim``, the unconstrained space. ``constrain``, ``unconstrain``,
    ``target_log_prob``, ``derived`` and ``draws`` report it in the constrained space with named
    ``columns``; for a plain target that space is ``z`` itself (columns ``z[0]``, ``z[1]``, ...).
    ``ModelTarget`` (the model language) has named, constrained parameters.

    For a flow ``q`` fit to a target ``t``, the density of ``q`` in the constrained space at given
    values is ``flow.log_prob(z) - t.constrain(z)[1]`` with ``z = t.unconstrain(values)``;
    ``t.target_log_prob(values)`` minus that is an importance log-weight.

    Arguments:
        name: a short name, reported in training summaries.
        dim: the dimension of ``z``.
        log_prob: maps ``z`` of shape ``(N, dim)`` to ``log p~(z)`` of shape ``(N,)``.
        log_z: ``log`` of the normalizing constant ``int p~(z) dz`` when known, else ``None``.
        sampler: optional ``sampler(n, generator) -> Tensor (n, dim)`` of exact samples.
        description: free text for people.
        spec: JSON that rebuilds it through ``nfcore.targets.from_spec`` (built-ins, expressions).
        context_dim: with ``context_dim > 0`` the target is conditional: ``log_prob`` is called as
            ``log_prob(z, context)`` with ``context`` of shape ``(N, context_dim)``, one context
            row per row of ``z`` (see ``check_context``).

    **Contexts.** A conditional target's ``log p~(z | c)`` depends on a context row ``c``: the
    values of its ``context_shapes`` flattened (row-major) and concatenated in declaration order,
    ``context_columns`` naming each entry. ``log_prob(z, context)`` takes one row for all of ``z``
    or one row per row of ``z``; ``check_context`` and ``pack_context`` turn a row, rows or named
    values into that form and raise ``TargetError`` naming the problem (wrong size, a missing or
    unknown name, a value that is not finite). ``at(c)`` fixes one context: an unconditional
    target, e.g. for a separate, non-amortized fit of one observation.

    Example:
        >>> import torch
        >>> t = Target("normal", 2, lambda z: -0.5 * (z * z).sum(-1), log_z=1.8378770664093453)
        >>> t.log_prob(torch.ones(3, 2))
        tensor([-1., -1., -1.])
    """

    def __init__(
        self,
        name: str,
        dim: int,
        log_prob: Callable[[Tensor], Tensor],
        *,
        log_z: float | None = None,
        sampler: Callable[[int, torch.Generator | None], Tensor] | None = None,
        description: str = "",
        spec: dict[str, Any] | None = None,
        context_dim: int = 0,
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise TargetError(f"Expected a positive integer dim; got {dim!r}")
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
            raise TargetError(f"Expected a non-negative integer context_dim; got {context_dim!r}")
        if not callable(log_prob):
            raise TargetError(f"Expected a callable log_prob; got {type(log_prob).__name__}")
        self.name = name
        self.dim = dim
        self._log_prob = log_prob
        self.log_z = None if log_z is None else float(log_z)
        self._sampler = sampler
        self.description = description
        #: A JSON description that rebuilds the target (``targets.from_spec``), when there is one.
        self.spec = spec
        #: The length of a context row (0: an unconditional target).
        self.context_dim = context_dim

    def __repr__(self) -> str:
        return f"Target({self.name!r}, dim={self.dim}, log_z={self.log_z})"

    @property
    def has_sampler(self) -> bool:
        return self._sampler is not None

    def log_prob(self, z: Tensor, context: Any = None) -> Tensor:
        """``log p~(z)`` (``log p~(z | context)`` for a conditional target) of shape ``(N,)`` for
        ``z`` of shape ``(N, dim)``; ``context`` as ``check_context`` takes it."""
        if z.ndim != 2 or z.shape[-1] != self.dim:
            raise TargetError(f"Expected z of shape (N, {self.dim}); got {tuple(z.shape)}")
        if self.context_dim:
            c = self.check_context(context, z.shape[0]).to(device=z.device, dtype=z.dtype)
            out = self._log_prob(z, c.expand(z.shape[0], -1))
        else:
            self.check_context(context)
            out = self._log_prob(z)
        if not isinstance(out, Tensor) or out.shape != z.shape[:1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TargetError(f"Target {self.name!r} must return a tensor of shape "
                              f"({z.shape[0]},); got {got}")
        return out

    # ------------------------------------------------------------------ contexts
    @property
    def context_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each context value's name and shape, in the order a context row concatenates them."""
        return {"context": (self.context_dim,)} if self.context_dim else {}

    @property
    def context_columns(self) -> list[str]:
        """The name of each entry of a context row (``x[0]``, ``y[1,2]``: 0-based, row-major)."""
        from .transforms import column_names

        return [c for name, shape in self.context_shapes.items()
                for c in column_names(name, shape)]

    def check_context(self, context: Any, n: int | None = None) -> Tensor | None:
        """A context as float64 rows ``(1 or n, context_dim)``, from a row, rows (``(M,
        context_dim)``, ``M`` 1 or ``n`` when ``n`` is given) or named values (``pack_context``);
        ``None`` for an unconditional target given none. Raises ``TargetError`` naming what is
        wrong: a context where none is taken, none where one is needed, the wrong size, a missing
        or unknown name, or a value that is not finite (NaN or infinite).

        Example:
            >>> t = Target("c", 1, lambda z, c: -0.5 * ((z - c) ** 2).sum(-1), context_dim=1)
            >>> t.check_context([0.5]).tolist()
            [[0.5]]
            >>> t.check_context([0.5, 1.0])
            Traceback (most recent call last):
            ...
            nfcore.errors.TargetError: context: expected rows of 1 number (context[0]); got 2 numbers
        """
        if not self.context_dim:
            if context is not None:
                raise TargetError(f"Target {self.name!r} takes no context; got one")
            return None
        if context is None:
            raise TargetError(f"Target {self.name!r} needs a context: {self._context_layout()}")
        if isinstance(context, Mapping):
            c = self.pack_context(context)
        else:
            if hasattr(context, "tolist") and not isinstance(context, Tensor):
                context = context.tolist()
            try:  # a tensor stays on its device
                c = (context.detach().to(torch.float64) if isinstance(context, Tensor)
                     else torch.as_tensor(context, dtype=torch.float64))
            except (TypeError, ValueError, RuntimeError) as e:
                raise TargetError(f"context: expected numbers; {e}"[:300]) from None
            if c.ndim == 1:
                c = c[None]
            if c.ndim != 2 or c.shape[-1] != self.context_dim:
                got = (f"{c.shape[-1]} number{'s' if c.shape[-1] != 1 else ''}" if c.ndim in (1, 2)
                       else f"shape {tuple(c.shape)}")
                raise TargetError(f"context: expected rows of {self._context_layout()}; got {got}")
        if n is not None and c.shape[0] not in (1, n):
            raise TargetError(f"context: expected 1 row or {n} rows (one per sample); got "
                              f"{c.shape[0]}")
        bad = ~torch.isfinite(c)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            what = "NaN" if bool(torch.isnan(c[row, col])) else "infinite"
            where = f"row {row}, " if c.shape[0] > 1 else ""
            raise TargetError(f"context: {where}{self.context_columns[col]} is {what}; every "
                              "context value must be finite")
        return c

    def _context_layout(self) -> str:
        d = self.context_dim
        shown = ", ".join(f"{k} {fmt_shape(v)}" if v else k for k, v in self.context_shapes.items())
        if list(self.context_shapes) == ["context"]:
            shown = ", ".join(self.context_columns[:3]) + (", ..." if d > 3 else "")
        return f"{d} number{'s' if d != 1 else ''} ({shown})"

    def pack_context(self, named: Mapping[str, Any]) -> Tensor:
        """Context rows ``(M, context_dim)`` from named values: each name of ``context_shapes``
        with a value of its shape (one row) or of shape ``(M, *shape)`` (``M`` rows), e.g.
        ``{"y": [0.1, 0.3]}`` for ``"context": {"y": {"shape": [2]}}``. Raises ``TargetError``
        naming a missing, unknown or misshapen value."""
        if not self.context_dim:
            raise TargetError(f"Target {self.name!r} takes no context; got one")
        if not isinstance(named, Mapping):
            raise TargetError(f"context: expected an object of name -> values; got "
                              f"{type(named).__name__}")
        shapes = self.context_shapes
        unknown = sorted(str(k) for k in named if k not in shapes)
        missing = [k for k in shapes if k not in named]
        if missing:
            raise TargetError(f"context: missing {missing}; expected values for {list(shapes)}")
        if unknown:
            raise TargetError(f"context: unknown {unknown}; expected values for {list(shapes)}")
        parts, rows = [], None
        for name, shape in shapes.items():
            value = named[name]
            if hasattr(value, "tolist") and not isinstance(value, Tensor):
                value = value.tolist()
            try:
                t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as e:
                raise TargetError(f"context.{name}: expected numbers; {e}"[:300]) from None
            if tuple(t.shape) == shape:
                t = t[None]
            elif t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise TargetError(f"context.{name}: expected shape {fmt_shape(shape)} (or (M, "
                                  f"{', '.join(map(str, shape))}) for M rows)".replace(", )", ")")
                                  + f"; got {fmt_shape(tuple(t.shape))}")
            if rows is not None and t.shape[0] != rows:
                raise TargetError(f"context.{name}: expected {rows} rows like the others; got "
                                  f"{t.shape[0]}")
            rows = t.shape[0]
            parts.append(t.reshape(rows, -1))
        return torch.cat(parts, -1)

    def at(self, context: Any) -> Target:
        """This target with its context fixed to one row: an unconditional ``Target`` (the same
        parameters, columns and derived quantities), e.g. for a non-amortized fit of one
        observation."""
        c = self.check_context(context)
        if c is None or c.shape[0] != 1:
            raise TargetError("at(): expected one context row")
        return _AtContext(self, c)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples, shape ``(n, dim)``; only for targets that know how."""
        if self._sampler is None:
            raise TargetError(f"Target {self.name!r} has no exact sampler")
        return self._sampler(n, generator)

    # ------------------------------------------------------------------ the constrained space
    # A plain target's parameters are ``z`` itself: the map is the identity. ``ModelTarget``
    # overrides these with named, constrained parameters and derived quantities.
    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's name and shape, in the order of ``param_columns``."""
        return {"z": (self.dim,)}

    @property
    def param_columns(self) -> list[str]:
        """Names of the constrained parameter columns (``constrain``'s output)."""
        return [f"z[{i}]" for i in range(self.dim)]

    @property
    def derived_columns(self) -> list[str]:
        """Names of the derived-quantity columns (``derived``'s output)."""
        return []

    @property
    def columns(self) -> list[str]:
        """Every reported column: ``param_columns`` then ``derived_columns``."""
        return self.param_columns + self.derived_columns

    def constrain(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Unconstrained ``z`` ``(N, dim)`` to constrained values ``(N, len(param_columns))`` and
        ``log|det d(values)/dz|`` ``(N,)``."""
        self._check_z(z)
        return z, z.new_zeros(z.shape[0])

    def unconstrain(self, values: Tensor) -> Tensor:
        """The inverse of ``constrain``: values ``(N, len(param_columns))`` to ``z`` ``(N, dim)``.
        Raises ``TargetError`` for values outside the support."""
        self._check_values(values)
        return values

    def in_support(self, values: Tensor) -> Tensor:
        """Whether each row of constrained values lies in the support, ``(N,)`` booleans."""
        self._check_values(values)
        return torch.isfinite(values).all(-1)

    def target_log_prob(self, values: Tensor, context: Any = None) -> Tensor:
        """The model's log density at constrained values, ``(N,)``, without the Jacobian of the
        transform (so ``log_prob(z) = target_log_prob(constrain(z)[0]) + constrain(z)[1]``)."""
        self._check_values(values)
        return self.log_prob(values, context)

    def derived(self, values: Tensor, context: Any = None) -> Tensor:
        """Derived quantities at constrained values, ``(N, len(derived_columns))``."""
        self._check_values(values)
        self.check_context(context, values.shape[0])
        return values.new_zeros(values.shape[0], 0)

    def draws(self, z: Tensor, log_q: Tensor, context: Any = None) -> Draws:
        """Report flow samples ``z`` with their ``log_q = log q(z)`` in the constrained space: named
        columns (derived quantities included), log q there and the model's log density (at
        ``context``, for a conditional target)."""
        if log_q.shape != z.shape[:1]:
            raise ShapeError(f"Expected log_q of shape ({z.shape[0]},); got {tuple(log_q.shape)}")
        values, ladj = self.constrain(z)
        samples = torch.cat([values, self.derived(values, context)], -1)
        return Draws(self.columns, samples, log_q - ladj, self.target_log_prob(values, context))

    def pack(self, named: Mapping[str, Any]) -> Tensor:
        """Constrained values ``(N, len(param_columns))`` from one array per parameter, each of
        shape ``(N, *shape)`` (see ``param_shapes``), e.g. ``{"mu": [0.1, 0.2], "tau": [1, 2]}``.
        Raises ``ShapeError`` naming a missing, unknown or misshapen parameter."""
        if not isinstance(named, Mapping):
            raise ShapeError(f"Expected an object of parameter name -> values; got "
                             f"{type(named).__name__}")
        shapes = self.param_shapes
        unknown = sorted(str(k) for k in named if k not in shapes)
        missing = [k for k in shapes if k not in named]
        if unknown or missing:
            raise ShapeError(f"Expected values for the parameters {list(shapes)}; "
                             + (f"missing {missing}" if missing else f"unknown {unknown}"))
        parts, rows = [], None
        for name, shape in shapes.items():
            try:
                t = torch.as_tensor(named[name], dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ShapeError(f"{name}: expected numbers; {e}") from None
            if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise ShapeError(f"{name}: expected shape (N, {', '.join(map(str, shape))})"
                                 .replace(", )", ")") + f"; got {tuple(t.shape)}")
            if rows is not None and t.shape[0] != rows:
                raise ShapeError(f"{name}: expected {rows} rows like the others; got {t.shape[0]}")
            rows = t.shape[0]
            parts.append(t.reshape(rows, -1))
        return torch.cat(parts, -1)

    def unpack(self, values: Tensor) -> dict[str, Tensor]:
        """One tensor ``(N, *shape)`` per parameter from constrained values; inverse of ``pack``."""
        self._check_values(values)
        out, start = {}, 0
        for name, shape in self.param_shapes.items():
            size = math.prod(shape)
            out[name] = values[:, start:start + size].reshape(values.shape[0], *shape)
            start += size
        return out

    def _check_z(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[-1] != self.dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ShapeError(f"Expected z of shape (N, {self.dim}); got {got}")

    def _check_values(self, values: Tensor) -> None:
        width = len(self.param_columns)
        if not isinstance(values, Tensor) or values.ndim != 2 or values.shape[-1] != width:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ShapeError(f"Expected values of shape (N, {width}); got {got}")


class _AtContext(Target):
    """A conditional target with its context fixed to one row (``Target.at``): its own density,
    constrained space, columns and derived quantities, with no context to give."""

    def __init__(self, parent: Target, context: Tensor):
        self.parent = parent
        self.context = context
        super().__init__(f"{parent.name}|context", parent.dim,
                         lambda z: parent.log_prob(z, self.context), log_z=None,
                         description=parent.description, spec=None)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.parent.param_shapes

    @property
    def param_columns(self) -> list[str]:
        return self.parent.param_columns

    @property
    def derived_columns(self) -> list[str]:
        return self.parent.derived_columns

    def constrain(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.parent.constrain(z)

    def unconstrain(self, values: Tensor) -> Tensor:
        return self.parent.unconstrain(values)

    def in_support(self, values: Tensor) -> Tensor:
        return self.parent.in_support(values)

    def target_log_prob(self, values: Tensor, context: Any = None) -> Tensor:
        self.check_context(context)
        return self.parent.target_log_prob(values, self.context)

    def derived(self, values: Tensor, context: Any = None) -> Tensor:
        self.check_context(context)
        return self.parent.derived(values, self.context)

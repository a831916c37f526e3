"""Parameter declarations of the model language and their unconstraining transforms, as Stan does
them: each constrained parameter is a smooth bijection of unconstrained reals, and the log
absolute Jacobian determinant of that map is added to the density, so that a flow over ``R^dim``
can fit it.

===================== ================================ =====================================
declaration           constrained from unconstrained   log |Jacobian|
===================== ================================ =====================================
``{}``                ``x = u``                        0
``{"lower": a}``      ``x = a + exp(u)``               ``u``
``{"upper": b}``      ``x = b - exp(u)``               ``u``
``lower`` and upper   ``x = a + (b - a) sigmoid(u)``   ``log(b - a) + log s(u) + log s(-u)``
``"ordered"``         ``x0 = u0 (or a + exp(u0))``,    ``sum_{i>=1} u_i`` (``+ u0`` with a)
                      ``x_i = x_{i-1} + exp(u_i)``
``"simplex"`` ([k])   stick-breaking from k - 1 reals  see ``simplex``
===================== ================================ =====================================

References: Stan Reference Manual, "Constraint transforms" (2024).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TargetError

__all__ = ["Param", "column_names", "inside", "lower_bound", "upper_bound", "interval", "ordered",
           "simplex",
           "PARAM_KEYS", "CONSTRAINTS", "MAX_AXIS", "SIMPLEX_TOLERANCE"]

PARAM_KEYS = ("shape", "lower", "upper", "constraint")
CONSTRAINTS = ("ordered", "simplex")
#: The longest axis a parameter may have.
MAX_AXIS = 4096
#: How far the entries of a simplex may sum from 1 and still be accepted by ``unconstrain``.
SIMPLEX_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- the transforms
def inside(x: Tensor, lower: float | None = None, upper: float | None = None) -> Tensor:
    """``x`` with the values that rounded onto a bound moved to the nearest representable number
    inside it. ``exp(u)`` underflows to 0 below ``u = -745`` in float64, and ``sigmoid(u)`` rounds
    to 1 above ``u = 37``: without this, ``x`` would sit on the bound, where a density such as
    ``beta_lpdf(x, 0.5, 0.5)`` or ``gamma_lpdf(x, 0.5, 1)`` is ``+inf`` although in ``u`` it is
    tiny, and one such draw in a thousand made the fit's diagnostics read all of the mass as
    missed. Inside, the density there stays finite and as small as it should be, within a few
    nats."""
    if lower is not None:
        x = torch.maximum(x, torch.nextafter(x.new_tensor(lower), x.new_tensor(math.inf)))
    if upper is not None:
        x = torch.minimum(x, torch.nextafter(x.new_tensor(upper), x.new_tensor(-math.inf)))
    return x


def lower_bound(u: Tensor, lower: float) -> tuple[Tensor, Tensor]:
    """``x = lower + exp(u)`` and its element-wise log-Jacobian ``u``."""
    return inside(lower + torch.exp(u), lower=lower), u


def upper_bound(u: Tensor, upper: float) -> tuple[Tensor, Tensor]:
    """``x = upper - exp(u)`` and its element-wise log-Jacobian ``u``."""
    return inside(upper - torch.exp(u), upper=upper), u


def interval(u: Tensor, lower: float, upper: float) -> tuple[Tensor, Tensor]:
    """``x = lower + (upper - lower) sigmoid(u)`` and its element-wise log-Jacobian."""
    width = upper - lower
    return (inside(lower + width * torch.sigmoid(u), lower, upper),
            math.log(width) - F.softplus(-u) - F.softplus(u))


def ordered(u: Tensor, lower: float | None = None) -> tuple[Tensor, Tensor]:
    """Stan's ordered transform along the last axis (``positive_ordered`` shifted to ``lower``
    when given): returns ``x`` and the log-Jacobian summed over that axis."""
    steps = torch.exp(u[..., 1:])
    first = u[..., :1] if lower is None else lower + torch.exp(u[..., :1])
    x = torch.cumsum(torch.cat([first, steps], -1), -1)
    ladj = u[..., 1:].sum(-1) + (0.0 if lower is None else u[..., 0])
    return x, ladj


def simplex(u: Tensor) -> tuple[Tensor, Tensor]:
    """Stan's stick-breaking simplex transform of ``k - 1`` reals (last axis) to ``k`` positive
    entries that sum to 1: ``z_i = sigmoid(u_i - log(k - 1 - i))`` breaks off the share ``z_i`` of
    the stick left, so ``u = 0`` is the centre of the simplex. Returns ``x`` and the log-Jacobian
    ``sum_i log z_i + log(1 - z_i) + log(stick left before i)``."""
    k = u.shape[-1] + 1
    offset = torch.log(torch.arange(k - 1, 0, -1, dtype=u.dtype, device=u.device))
    a = u - offset
    log_z, log_1mz = -F.softplus(-a), -F.softplus(a)
    # log of the stick left before each break: exclusive cumulative sum of log(1 - z)
    log_left = torch.cumsum(torch.cat([torch.zeros_like(a[..., :1]), log_1mz], -1), -1)
    x = torch.cat([torch.exp(log_left[..., :-1] + log_z), torch.exp(log_left[..., -1:])], -1)
    x = inside(x, lower=0.0)  # an entry that underflowed to 0 (see ``inside``)
    ladj = (log_z + log_1mz + log_left[..., :-1]).sum(-1)
    return x, ladj


def _simplex_inverse(x: Tensor) -> Tensor:
    k = x.shape[-1]
    left = 1.0 - torch.cumsum(x, -1)[..., :-1]
    left = torch.cat([torch.ones_like(x[..., :1]), left[..., :-1]], -1)
    z = x[..., :-1] / left
    offset = torch.log(torch.arange(k - 1, 0, -1, dtype=x.dtype, device=x.device))
    return torch.logit(z) + offset


# --------------------------------------------------------------------------- declarations
def _number(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TargetError(f"{field}: expected a finite number; got {value!r}")
    return float(value)


def _index_names(shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [""]
    grid = torch.cartesian_prod(*(torch.arange(n) for n in shape)).reshape(-1, len(shape))
    return ["[" + ",".join(str(int(i)) for i in row) + "]" for row in grid]


def column_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """Stan-style names, 0-based and row-major: ``mu``, ``theta[0]``, ``beta[1,2]``."""
    return [name + suffix for suffix in _index_names(shape)]


@dataclass(frozen=True)
class Param:
    """One declared parameter: its ``shape``, optional ``lower``/``upper`` bounds and optional
    ``constraint`` (``"ordered"`` or ``"simplex"``, on a vector).

    Example:
        >>> import torch
        >>> p = Param.from_json("tau", {"lower": 0})
        >>> x, ladj = p.constrain(torch.zeros(2, 1))
        >>> x, ladj
        (tensor([1., 1.]), tensor([0., 0.]))
        >>> p.unconstrain(x)
        tensor([[0.],
                [0.]])
    """

    name: str
    shape: tuple[int, ...] = ()
    lower: float | None = None
    upper: float | None = None
    constraint: str | None = None

    @classmethod
    def from_json(cls, name: str, spec: Any) -> Param:
        """Check a declaration such as ``{"shape": [8], "lower": 0}``; errors name the field."""
        field = f"params.{name}"
        if not isinstance(spec, Mapping):
            raise TargetError(f"{field}: expected an object with keys among {list(PARAM_KEYS)}; "
                              f"got {type(spec).__name__}")
        extra = sorted(str(k) for k in spec if k not in PARAM_KEYS)
        if extra:
            raise TargetError(f"{field}: unknown keys {extra}; allowed: {list(PARAM_KEYS)}")
        shape = spec.get("shape", [])
        if (not isinstance(shape, list | tuple) or len(shape) > 2
                or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_AXIS
                       for n in shape)):
            raise TargetError(f"{field}.shape: expected [], [k] or [k, m] with lengths from 1 to "
                              f"{MAX_AXIS}; got {shape!r}")
        shape = tuple(shape)
        lower = _number(f"{field}.lower", spec.get("lower"))
        upper = _number(f"{field}.upper", spec.get("upper"))
        if lower is not None and upper is not None and not lower < upper:
            raise TargetError(f"{field}: expected lower < upper; got lower={lower}, upper={upper}")
        constraint = spec.get("constraint")
        if constraint is not None and constraint not in CONSTRAINTS:
            raise TargetError(f"{field}.constraint: expected one of {list(CONSTRAINTS)}; got "
                              f"{constraint!r}")
        if constraint is not None and (len(shape) != 1 or (constraint == "simplex"
                                                            and shape[0] < 2)):
            need = "[k] with k >= 2" if constraint == "simplex" else "[k]"
            raise TargetError(f"{field}: constraint {constraint!r} needs a vector shape {need}; "
                              f"got {list(shape)}")
        if constraint == "simplex" and (lower is not None or upper is not None):
            raise TargetError(f"{field}: a simplex takes no lower or upper bound")
        if constraint == "ordered" and upper is not None:
            raise TargetError(f"{field}: an ordered vector takes a lower bound only")
        return cls(name, shape, lower, upper, constraint)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.shape:
            out["shape"] = list(self.shape)
        for key in ("lower", "upper", "constraint"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @property
    def size(self) -> int:
        """Number of constrained entries (columns)."""
        return math.prod(self.shape)

    @property
    def free(self) -> int:
        """Number of unconstrained reals."""
        return self.size - 1 if self.constraint == "simplex" else self.size

    @property
    def columns(self) -> list[str]:
        return column_names(self.name, self.shape)

    def constrain(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``u`` of shape ``(N, free)`` to ``x`` of shape ``(N, *shape)`` and ``log|det dx/du|``
        of shape ``(N,)``."""
        n = u.shape[0]
        if self.constraint == "simplex":
            return simplex(u)
        if self.constraint == "ordered":
            return ordered(u, self.lower)
        if self.lower is not None and self.upper is not None:
            x, ladj = interval(u, self.lower, self.upper)
        elif self.lower is not None:
            x, ladj = lower_bound(u, self.lower)
        elif self.upper is not None:
            x, ladj = upper_bound(u, self.upper)
        else:
            return u.reshape(n, *self.shape), u.new_zeros(n)
        return x.reshape(n, *self.shape), ladj.sum(-1)

    def in_support(self, x: Tensor) -> Tensor:
        """Whether each row of ``x`` (shape ``(N, *shape)``) lies inside the support, ``(N,)``."""
        flat = x.reshape(x.shape[0], -1)
        ok = torch.isfinite(flat).all(-1)
        if self.constraint == "simplex":
            total = flat.sum(-1)
            return ok & (flat > 0).all(-1) & ((total - 1).abs() <= SIMPLEX_TOLERANCE)
        if self.constraint == "ordered":
            ok = ok & (flat[:, 1:] > flat[:, :-1]).all(-1)
            return ok & (flat[:, 0] > self.lower) if self.lower is not None else ok
        if self.lower is not None:
            ok = ok & (flat > self.lower).all(-1)
        if self.upper is not None:
            ok = ok & (flat < self.upper).all(-1)
        return ok

    def unconstrain(self, x: Tensor) -> Tensor:
        """The inverse of ``constrain``: ``x`` of shape ``(N, *shape)`` to ``u`` of shape
        ``(N, free)``. Raises ``TargetError`` naming the first row outside the support."""
        n = x.shape[0]
        inside = self.in_support(x)
        if not bool(inside.all()):
            row = int((~inside).nonzero()[0, 0])
            raise TargetError(f"params.{self.name}: row {row} is outside the support "
                              f"({self.describe()})")
        flat = x.reshape(n, -1)
        if self.constraint == "simplex":
            return _simplex_inverse(flat / flat.sum(-1, keepdim=True))
        if self.constraint == "ordered":
            first = flat[:, :1] if self.lower is None else torch.log(flat[:, :1] - self.lower)
            return torch.cat([first, torch.log(flat[:, 1:] - flat[:, :-1])], -1)
        if self.lower is not None and self.upper is not None:
            return torch.logit((flat - self.lower) / (self.upper - self.lower))
        if self.lower is not None:
            return torch.log(flat - self.lower)
        if self.upper is not None:
            return torch.log(self.upper - flat)
        return flat

    def describe(self) -> str:
        if self.constraint == "simplex":
            return "a simplex: positive entries that sum to 1"
        parts = []
        if self.constraint == "ordered":
            parts.append("strictly increasing")
        if self.lower is not None:
            parts.append(f"above {self.lower:g}")
        if self.upper is not None:
            parts.append(f"below {self.upper:g}")
        return ", ".join(parts) or "any finite real"

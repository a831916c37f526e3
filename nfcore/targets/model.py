"""The model language: a Bayesian model written as JSON, compiled to a ``Target`` over the
unconstrained reals that a flow can fit, and reported back in the model's own, constrained terms.

This is a contract; clients and tests use these names::

    {"params": {"mu": {}, "tau": {"lower": 0}, "theta_tilde": {"shape": [8]}},
     "data": {"y": [28, 8, -3, 7, -1, 1, 18, 12], "sigma": [15, 10, 16, 11, 9, 11, 10, 18]},
     "log_prob": ["normal_lpdf(mu, 0, 5)", "cauchy_lpdf(tau, 0, 5)",
                  "normal_lpdf(theta_tilde, 0, 1)", "normal_lpdf(y, mu + tau * theta_tilde, sigma)"],
     "derived": {"theta": "mu + tau * theta_tilde"}}

and, for a conditional model (amortized fits, ``fit_target(..., contexts=...)``)::

    {"params": {"theta": {"shape": [10]}},
     "context": {"x": {"shape": [10]}},
     "log_prob": ["normal_lpdf(theta, 0, sqrt(0.1))", "normal_lpdf(x, theta, sqrt(0.1))"]}

- ``params`` maps each name to ``{"shape": [] | [k] | [k, m], "lower": a, "upper": b,
  "constraint": "ordered" | "simplex"}``; every key is optional and ``{}`` is a real scalar. The
  unconstraining transforms and their log-Jacobians are added automatically, as Stan does (see
  ``nfcore.targets.transforms``).
- ``data`` holds numbers and nested lists (vectors, matrices, up to 3 axes). A list of whole
  numbers (JSON integers) is integer data, which may index: ``alpha[group]``, 0-based.
- ``log_prob`` is one expression or a list of them. Each term is summed over all its elements and
  the sums are added, like Stan's ``target +=``. Log densities are element-wise
  (``normal_lpdf(y, m, s)`` has the broadcast shape of its arguments); the term around it sums it.
- ``derived`` names expressions computed per sample and returned with the samples, like Stan's
  transformed parameters and generated quantities. They do not enter the density.
- ``context`` (optional) declares observed real values that change from one fit to the next,
  ``{name: {"shape": [] | [k] | [k, m] | [k, m, n]}}`` (``{}`` is a scalar), next to the fixed
  ``data``. Expressions use them like data; their values come with each evaluation. A **context
  row** is every context value flattened row-major and concatenated in declaration order
  (``context_columns`` names the entries: ``x[0]``, ..., as for parameters), so
  ``{"a": {}, "x": {"shape": [2]}}`` gives rows ``[a, x[0], x[1]]``. ``log_prob(z, context)``
  takes one row for all samples or one row per sample; ``pack_context({"a": 1, "x": [2, 3]})``
  builds rows from named values; ``at(row)`` gives the unconditional model with the context
  moved into ``data``.

The expressions use the grammar of ``nfcore.targets.expression`` and the functions of
``nfcore.targets.functions``. Errors are ``ExpressionError`` (or ``TargetError`` for a bad
declaration) naming the field (``log_prob[2]``, ``derived.theta``, ``params.tau.lower``) and, in an
expression, the line and column.

**Spaces.** The flow lives on ``z``, the concatenation of every parameter's unconstrained reals
in declaration order (row-major within a parameter; a simplex of ``k`` entries has ``k - 1``).
``constrain`` maps ``z`` to the constrained values, one column per entry of each parameter
(``columns``: ``mu``, ``theta[0]``, ``beta[1,2]``: Stan's names, 0-based), and ``log_prob(z)``
is the model's density plus the log-Jacobian. ``target_log_prob(values)`` is the density alone;
with ``log q_constrained = log q(z) - log|det d(values)/dz|``, the differences
``target_log_prob - log q_constrained`` are importance log-weights (``Target.draws`` computes all
of it). Everything is evaluated in float64 and returned in the caller's dtype; in a narrower dtype
``log_prob(z)`` saturates at ``finfo(dtype).min / 2**20`` (about -3e32 in float32) rather than
overflowing to ``-inf``.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ExpressionError, TargetError
from .base import Target
from .expression import LIMITS, Compiler, Value, fmt_shape
from .functions import FUNCTIONS
from .transforms import Param, column_names

__all__ = ["ModelTarget", "from_model", "MODEL_KEYS", "MODEL_LIMITS"]

#: The keys of a model. ``"context"`` holds observed inputs that change from one fit to the next;
#: they enter the compiler as more batched variables, after the parameters.
MODEL_KEYS = ("params", "data", "context", "log_prob", "derived")
#: Bounds on a model's size, next to the expression bounds in ``expression.LIMITS``.
MODEL_LIMITS = {"params": 64, "data": 64, "context": 64, "context_size": 4096, "data_size": 2_000_000, "data_rank": 3, "terms": 256,
                "derived": 64}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")


def _check_name(field: str, name: Any, taken: Mapping[str, str]) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
        raise TargetError(f"{field}: {name!r} is not a valid name (a letter, then up to 63 "
                          "letters, digits or underscores)")
    if name in FUNCTIONS:
        raise TargetError(f"{field}: {name!r} is reserved (a function name)")
    if name in taken:
        raise TargetError(f"{field}: {name!r} is already a {taken[name]} name")


def _array(field: str, value: Any, budget: int) -> Tensor:
    """A number or a rectangular nested list of numbers as a float64 or int64 tensor."""
    if hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()  # numpy arrays and tensors, from Python callers
    shape: list[int] = []
    probe = value
    while isinstance(probe, list | tuple):
        if not probe:
            raise TargetError(f"{field}: lists must not be empty")
        shape.append(len(probe))
        if len(shape) > MODEL_LIMITS["data_rank"]:
            raise TargetError(f"{field}: at most {MODEL_LIMITS['data_rank']} levels of nesting")
        probe = probe[0]
    size = math.prod(shape)
    if size > budget:
        raise TargetError(f"data: more than {MODEL_LIMITS['data_size']} numbers in all")
    flat: list[Any] = []
    real = False

    def bad(v: Any) -> TargetError:
        return TargetError(f"{field}: expected a number or a rectangular nested list of numbers; "
                           f"got {v!r}"[:300])

    def walk(v: Any, depth: int) -> None:
        nonlocal real
        if depth == len(shape):
            if type(v) is float:
                real = True
            elif type(v) is not int:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise bad(v)
                real = real or isinstance(v, float)
            flat.append(v)
            return
        if not isinstance(v, list | tuple) or len(v) != shape[depth]:
            raise TargetError(f"{field}: nested lists must be rectangular: expected "
                              f"{shape[depth]} entries at depth {depth}")
        for item in v:
            walk(item, depth + 1)

    walk(value, 0)
    if real:
        t = torch.tensor([float(v) for v in flat], dtype=torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise TargetError(f"{field}: numbers must be finite")
    else:
        if any(abs(v) >= 2**62 for v in flat):
            raise TargetError(f"{field}: an integer is too large")
        t = torch.tensor(flat, dtype=torch.int64)
    return t.reshape(shape)


def _terms(log_prob: Any) -> list[str]:
    terms = [log_prob] if isinstance(log_prob, str) else log_prob
    if not isinstance(terms, list | tuple) or not 1 <= len(terms) <= MODEL_LIMITS["terms"]:
        raise TargetError(f"log_prob: expected an expression or a list of 1 to "
                          f"{MODEL_LIMITS['terms']} expressions; got {type(log_prob).__name__}")
    return list(terms)


class ModelTarget(Target):
    """A ``Target`` built from a model in the model language (see the module docstring).

    Arguments:
        spec: the model, ``{"params", "data", "log_prob", "derived"}`` (``data`` and ``derived``
            are optional).
        name: a short name for training summaries.

    Example:
        >>> import torch
        >>> model = ModelTarget({
        ...     "params": {"mu": {}, "tau": {"lower": 0}, "theta_tilde": {"shape": [8]}},
        ...     "data": {"y": [28, 8, -3, 7, -1, 1, 18, 12],
        ...              "sigma": [15, 10, 16, 11, 9, 11, 10, 18]},
        ...     "log_prob": ["normal_lpdf(mu, 0, 5)", "cauchy_lpdf(tau, 0, 5)",
        ...                  "normal_lpdf(theta_tilde, 0, 1)",
        ...                  "normal_lpdf(y, mu + tau * theta_tilde, sigma)"],
        ...     "derived": {"theta": "mu + tau * theta_tilde"}})
        >>> model.dim, model.columns[:3], model.columns[-1]
        (10, ['mu', 'tau', 'theta_tilde[0]'], 'theta[7]')
        >>> z = torch.zeros(4, 10)
        >>> values, ladj = model.constrain(z)
        >>> values[0, :3], ladj
        (tensor([0., 1., 0.]), tensor([0., 0., 0., 0.]))
        >>> torch.allclose(model.log_prob(z), model.target_log_prob(values) + ladj)
        True
        >>> torch.allclose(model.unconstrain(values), z)
        True
    """

    def __init__(self, spec: Mapping[str, Any], *, name: str = "model"):
        if not isinstance(spec, Mapping):
            raise TargetError(f"Expected a model object; got {type(spec).__name__}")
        extra = sorted(str(k) for k in spec if k not in MODEL_KEYS)
        if extra or "params" not in spec or "log_prob" not in spec:
            raise TargetError(f"model: expected keys {list(MODEL_KEYS)} ('params' and 'log_prob' "
                              f"required); got {sorted(map(str, spec))}")
        taken: dict[str, str] = {}
        self.params = self._params(spec["params"], taken)
        dim = sum(p.free for p in self.params)
        if dim > LIMITS["dim"]:
            raise TargetError(f"params: {dim} unconstrained reals in all; at most {LIMITS['dim']}")
        data = self._data(spec.get("data"), taken)
        self._context = self._contexts(spec.get("context"), taken)
        terms = _terms(spec["log_prob"])
        derived = spec.get("derived") or {}
        if not isinstance(derived, Mapping) or len(derived) > MODEL_LIMITS["derived"]:
            raise TargetError(f"derived: expected an object of at most {MODEL_LIMITS['derived']} "
                              "name -> expression")
        for key in derived:
            _check_name("derived", key, taken)

        compiler = Compiler({**{p.name: p.shape for p in self.params}, **self._context}, data)
        self._terms: list[tuple[str, Value]] = []
        for i, text in enumerate(terms):
            field = "log_prob" if isinstance(spec["log_prob"], str) else f"log_prob[{i}]"
            self._terms.append((field, compiler.compile(text, field, _numbers("term"))))
        self._derived: list[tuple[str, Value]] = [
            (key, compiler.compile(text, f"derived.{key}", _numbers("derived quantity")))
            for key, text in derived.items()]
        self._program = compiler.program()
        self._constant = sum(float(v.const.sum()) for _, v in self._terms if not v.batched)
        self._derived_columns = [c for key, v in self._derived for c in column_names(key, v.shape)]

        normalized: dict[str, Any] = {"params": {p.name: p.to_json() for p in self.params}}
        if "data" in spec:
            normalized["data"] = {k: t.tolist() for k, t in data.items()}
        if self._context:
            normalized["context"] = {k: {"shape": list(v)} for k, v in self._context.items()}
        normalized["log_prob"] = (spec["log_prob"] if isinstance(spec["log_prob"], str)
                                  else list(terms))
        if "derived" in spec:
            normalized["derived"] = dict(derived)
        super().__init__(name, dim, self._log_prob_z, description="; ".join(terms)[:500],
                         spec=normalized,
                         context_dim=sum(math.prod(s) for s in self._context.values()))
        self._dry_run()

    # ------------------------------------------------------------------ building
    @staticmethod
    def _params(params: Any, taken: dict[str, str]) -> list[Param]:
        if not isinstance(params, Mapping) or not 1 <= len(params) <= MODEL_LIMITS["params"]:
            raise TargetError(f"params: expected an object of 1 to {MODEL_LIMITS['params']} "
                              "name -> declaration")
        out = []
        for key, decl in params.items():
            _check_name("params", key, taken)
            out.append(Param.from_json(key, decl))
            taken[key] = "parameter"
        return out

    @staticmethod
    def _data(data: Any, taken: dict[str, str]) -> dict[str, Tensor]:
        if data is None:
            return {}
        if not isinstance(data, Mapping) or len(data) > MODEL_LIMITS["data"]:
            raise TargetError(f"data: expected an object of at most {MODEL_LIMITS['data']} "
                              "name -> number or nested list")
        out: dict[str, Tensor] = {}
        budget = MODEL_LIMITS["data_size"]
        for key, value in data.items():
            _check_name("data", key, taken)
            out[key] = _array(f"data.{key}", value, budget)
            budget -= out[key].numel()
            taken[key] = "data"
        return out

    @staticmethod
    def _contexts(context: Any, taken: dict[str, str]) -> dict[str, tuple[int, ...]]:
        if context is None:
            return {}
        if not isinstance(context, Mapping) or len(context) > MODEL_LIMITS["context"]:
            raise TargetError(f"context: expected an object of at most {MODEL_LIMITS['context']} "
                              'name -> {"shape": [...]}')
        out: dict[str, tuple[int, ...]] = {}
        for key, decl in context.items():
            _check_name("context", key, taken)
            if decl is None:
                decl = {}
            if not isinstance(decl, Mapping) or set(decl) - {"shape"}:
                raise TargetError(f'context.{key}: expected {{"shape": [...]}} (or {{}} for a '
                                  f"scalar); got {decl!r}"[:300])
            shape = decl.get("shape", [])
            if (not isinstance(shape, list | tuple) or len(shape) > MODEL_LIMITS["data_rank"]
                    or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                           for n in shape)):
                raise TargetError(f"context.{key}.shape: expected a list of up to "
                                  f"{MODEL_LIMITS['data_rank']} positive integers; got {shape!r}"
                                  [:300])
            out[key] = tuple(shape)
            taken[key] = "context"
        if sum(math.prod(s) for s in out.values()) > MODEL_LIMITS["context_size"]:
            raise TargetError(f"context: more than {MODEL_LIMITS['context_size']} numbers in all")
        return out

    def _dry_run(self) -> None:
        """Evaluate everything once, so that no model that compiled can fail when it is used."""
        z = torch.zeros(2, self.dim, dtype=torch.float64)
        env = self._env(self._split(z)[0], z, self._zero_context(z))
        for field, value in self._terms + [(f"derived.{k}", v) for k, v in self._derived]:
            if not value.batched:
                continue
            try:
                out = value.run(env)
            except (RuntimeError, ValueError, IndexError) as e:  # pragma: no cover - a bug
                raise ExpressionError(f"{field}: cannot be evaluated: {e}") from None
            if tuple(out.shape) != (2, *value.shape):  # pragma: no cover - a bug
                raise RuntimeError(f"internal: {field} gave {tuple(out.shape)}, not "
                                   f"{(2, *value.shape)}")

    # ------------------------------------------------------------------ evaluation
    def _split(self, z: Tensor) -> tuple[list[Tensor], Tensor]:
        """Unconstrained ``z`` to each parameter's constrained tensor and the total log-Jacobian."""
        xs, ladj, start = [], z.new_zeros(z.shape[0]), 0
        for p in self.params:
            x, part = p.constrain(z[:, start:start + p.free])
            xs.append(x)
            ladj = ladj + part
            start += p.free
        return xs, ladj

    def _zero_context(self, like: Tensor) -> Tensor | None:
        return like.new_zeros(like.shape[0], self.context_dim) if self._context else None

    def _env(self, xs: Sequence[Tensor], like: Tensor, context: Tensor | None
             ) -> tuple[Sequence[Tensor], list[Tensor]]:
        if self._context:
            n = like.shape[0]
            c = context.to(device=like.device, dtype=like.dtype).expand(n, -1)
            xs = [*xs, *(t.reshape(n, *shape) for t, shape in zip(
                c.split([math.prod(s) for s in self._context.values()], -1),
                self._context.values(), strict=True))]
        return xs, self._program.consts(like.dtype, like.device)

    def _density(self, xs: Sequence[Tensor], like: Tensor, context: Tensor | None) -> Tensor:
        env = self._env(xs, like, context)
        n = like.shape[0]
        total = like.new_full((n,), self._constant)
        for _, value in self._terms:
            if value.batched:
                total = total + value.run(env).reshape(n, -1).sum(-1)
        return total

    def _log_prob_z(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        z64 = z.to(torch.float64)
        xs, ladj = self._split(z64)
        out = self._density(xs, z64, context) + ladj
        if z.dtype != torch.float64:
            # A density far below the caller's dtype's range (e.g. -1e69 where an AR(MA) recursion
            # explodes) saturates instead of becoming -inf, so that one such sample does not make
            # a whole training batch non-finite; a batch of up to 2**20 of them still sums.
            out = out.clamp(min=torch.finfo(z.dtype).min / 2**20)
        return out.to(z.dtype)

    def _values(self, values: Tensor) -> list[Tensor]:
        n = values.shape[0]
        return [t.reshape(n, *p.shape) for p, t in
                zip(self.params, values.split([p.size for p in self.params], -1), strict=True)]

    # ------------------------------------------------------------------ the public API
    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: p.shape for p in self.params}

    @property
    def param_columns(self) -> list[str]:
        return [c for p in self.params for c in p.columns]

    @property
    def derived_columns(self) -> list[str]:
        return list(self._derived_columns)

    @property
    def derived_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each derived quantity's name and per-sample shape, in the order of its columns."""
        return {key: value.shape for key, value in self._derived}

    def constrain(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check_z(z)
        xs, ladj = self._split(z.to(torch.float64))
        values = torch.cat([x.reshape(z.shape[0], -1) for x in xs], -1)
        return values.to(z.dtype), ladj.to(z.dtype)

    def unconstrain(self, values: Tensor) -> Tensor:
        self._check_values(values)
        xs = self._values(values.to(torch.float64))
        return torch.cat([p.unconstrain(x) for p, x in zip(self.params, xs, strict=True)],
                         -1).to(values.dtype)

    def in_support(self, values: Tensor) -> Tensor:
        self._check_values(values)
        inside = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
        for p, x in zip(self.params, self._values(values.to(torch.float64)), strict=True):
            inside &= p.in_support(x)
        return inside

    def target_log_prob(self, values: Tensor, context: Any = None) -> Tensor:
        """The model's log density at constrained values, ``(N,)``: the sum of the terms, without
        the Jacobian; ``-inf`` for rows outside the parameters' support."""
        self._check_values(values)
        c = self.check_context(context, values.shape[0])
        v64 = values.to(torch.float64)
        out = self._density(self._values(v64), v64, c)
        return torch.where(self.in_support(values), out, float("-inf")).to(values.dtype)

    def derived(self, values: Tensor, context: Any = None) -> Tensor:
        self._check_values(values)
        c = self.check_context(context, values.shape[0])
        v64 = values.to(torch.float64)
        n = values.shape[0]
        env = self._env(self._values(v64), v64, c)
        parts = [value.run(env).reshape(n, -1) if value.batched
                 else value.const.to(device=values.device, dtype=torch.float64).reshape(1, -1)
                 .expand(n, -1) for _, value in self._derived]
        if not parts:
            return values.new_zeros(n, 0)
        return torch.cat(parts, -1).to(values.dtype)

    @property
    def context_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._context)

    def at(self, context: Any) -> ModelTarget:
        """The unconditional model with this context row moved into ``data`` (its ``spec``
        rebuilds it, so a fit of it is stored like any other)."""
        c = self.check_context(context)
        if c is None or c.shape[0] != 1:
            raise TargetError("at(): expected one context row")
        spec = dict(self.spec)
        del spec["context"]
        data = dict(spec.get("data", {}))
        start = 0
        for key, shape in self._context.items():
            size = math.prod(shape)
            data[key] = c[0, start:start + size].reshape(shape).tolist()
            start += size
        spec["data"] = data
        return ModelTarget(spec, name=self.name)

    def __repr__(self) -> str:
        return (f"ModelTarget(params={[p.name for p in self.params]}, dim={self.dim}, "
                f"terms={len(self._terms)}, derived={[k for k, _ in self._derived]})")


def _numbers(what: str):
    def check(value: Value, node: ast.AST) -> None:
        if value.kind == "bool":
            raise ExpressionError(f"The {what} is a comparison; it must give numbers "
                                  "(use where(...))", (1, node.col_offset))
        if not value.batched and not bool(torch.isfinite(value.const.double()).all()):
            raise ExpressionError(f"The {what} does not depend on the parameters and is not "
                                  f"finite (shape {fmt_shape(value.shape)})", (1, node.col_offset))

    return check


def from_model(spec: Mapping[str, Any]) -> ModelTarget:
    """A ``ModelTarget`` from a model in the model language (see the module docstring).

    Example:
        >>> t = from_model({"params": {"p": {"constraint": "simplex", "shape": [3]}},
        ...                 "log_prob": "sum(log(p))"})
        >>> t.dim, t.columns
        (2, ['p[0]', 'p[1]', 'p[2]'])
    """
    return ModelTarget(spec)

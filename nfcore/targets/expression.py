"""The expression compiler: text to torch ops through an AST whitelist, never evaluated as Python.

One compiler serves both the model language (``nfcore.targets.model``) and the older
``{"dim", "log_prob", "constants"}`` form over a flat vector ``z`` (``compile_expression``,
``from_expression``).

**Grammar.** The text is parsed with ``ast.parse(mode="eval")`` and every node is checked against a
whitelist:

- numbers (integer and real literals), and names: the variables (parameters, or ``z``) and the data;
- ``+ - * / **``, unary ``-`` and ``+``, ``@`` (matrix-vector, matrix-matrix, vector-vector);
- one comparison (``< <= > >= == !=``) as the first argument of ``where``;
- indexing and slicing on any axis, numpy style: ``x[:, 2]``, ``y[1:]``, ``beta[g]``, with integer
  literals, integer expressions of the data (``y[K:]``) and integer arrays of data (0-based, as
  numpy; several arrays broadcast together);
- calls of the functions in ``FUNCTIONS`` (``nfcore.targets.functions``), by name, positional only.

Anything else (attributes, lambdas, comprehensions, keywords, strings, unknown names or functions) is
an ``ExpressionError`` that names the problem and its (line, column) in the text.

**Values.** Every value has a shape per sample (``[]`` for a scalar) and a kind: real, integer (only
data and literals are integer) or boolean (a comparison). Operands broadcast as in numpy. Shapes,
kinds and index ranges are all checked at compile time, so those errors carry a position too. A
value that depends on no variable is computed once, at compile time, in float64 (constant folding):
``log(weight)`` or ``X[:, 1:] - mean(X[:, 1:], 0)`` cost nothing per step. At run time every value
that depends on the variables carries a leading sample axis.

**Bounds.** The text length, the number of AST nodes, the nesting depth and the number of elements
of every value (``LIMITS``) are bounded, and nothing loops: each node is a fixed number of torch ops
(``linear_recurrence`` is a log-depth scan).

**The older form.** ``compile_expression(text, dim, constants)`` keeps its own, narrower rules:
indices are integer literals on the one axis, there is no ``@``, and the whole expression must give
one value per sample.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ExpressionError
from .base import Target

# ``FUNCTIONS`` (the library, ``nfcore.targets.functions``) can also be imported from here.
__all__ = ["compile_expression", "from_expression", "Compiler", "Program", "Value", "LIMITS",
           "fmt_shape"]

#: Size bounds on expressions, their values and the older form's constants.
LIMITS = {"length": 10_000, "nodes": 2_000, "depth": 100, "constants": 64,
          "constant_size": 10_000, "total_constant_size": 100_000, "dim": 4096,
          # elements of one value: per sample when it depends on the variables, else in all
          "value_size": 100_000, "constant_value_size": 2_000_000}

#: A run-time environment: the variables' tensors (each ``(S, *shape)``) and the constants.
Env = tuple[Sequence[Tensor], Sequence[Tensor]]

_OPERATORS: dict[type, tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {
    ast.Add: ("+", torch.add), ast.Sub: ("-", torch.sub), ast.Mult: ("*", torch.mul),
    ast.Div: ("/", torch.div), ast.Pow: ("**", torch.pow),
}
_COMPARISONS: dict[type, Callable[[Tensor, Tensor], Tensor]] = {
    ast.Lt: torch.lt, ast.LtE: torch.le, ast.Gt: torch.gt, ast.GtE: torch.ge, ast.Eq: torch.eq,
    ast.NotEq: torch.ne,
}
_OPERATOR_SYMBOLS = {ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
                     ast.RShift: ">>", ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^",
                     ast.Not: "not", ast.Invert: "~", ast.And: "and", ast.Or: "or"}
_NODE_NAMES = {ast.Attribute: "attribute access", ast.Lambda: "lambda", ast.ListComp: "a comprehension",
               ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
               ast.GeneratorExp: "a generator expression", ast.IfExp: "an if-expression (use where)",
               ast.NamedExpr: "assignment (:=)", ast.Starred: "unpacking (*)",
               ast.JoinedStr: "an f-string", ast.Await: "await", ast.Yield: "yield",
               ast.YieldFrom: "yield", ast.List: "a list literal", ast.Tuple: "a tuple",
               ast.Dict: "a dict literal", ast.Set: "a set literal", ast.BoolOp: "and/or"}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_INT_LIMIT = 2**62


def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as the model language writes it: ``[]``, ``[8]``, ``[3, 2]``."""
    return "[" + ", ".join(str(n) for n in shape) + "]"


@dataclass(frozen=True)
class Value:
    """A compiled value: its per-sample ``shape``, its ``kind`` (``"real"``, ``"int"`` or
    ``"bool"``), and either ``const`` (computed at compile time, no sample axis) or ``run(env)``
    (a tensor with a leading sample axis)."""

    shape: tuple[int, ...]
    kind: str
    const: Tensor | None = None
    run: Callable[[Env], Tensor] | None = None

    @property
    def batched(self) -> bool:
        return self.const is None


def _pos(node: ast.AST) -> tuple[int, int]:
    # The text is parsed as one line: the column is a UTF-8 byte offset into it, mapped back later.
    return (1, getattr(node, "col_offset", 0))


def _locator(text: str, flat: str, indent: int) -> Callable[..., tuple[int, int]]:
    """Map an offset into the one-line ``flat`` text (``text`` less ``indent`` leading blanks) to
    ``(line, column)`` of ``text``."""
    encoded = flat.encode()
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)

    def locate(offset: int, chars: bool = False) -> tuple[int, int]:
        if not chars:
            offset = len(encoded[:offset].decode(errors="ignore"))
        offset = min(offset + indent, len(text))
        line = max(i for i, start in enumerate(starts) if start <= offset)
        return (line + 1, offset - starts[line])

    return locate


def _describe(node: ast.AST) -> str:
    kind = type(node)
    if kind in _NODE_NAMES:
        return _NODE_NAMES[kind]
    return f"'{kind.__name__}'"


def _check_size(tree: ast.AST) -> None:
    count, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > LIMITS["nodes"]:
            raise ExpressionError(f"Expression is too large: more than {LIMITS['nodes']} nodes")
        if depth > LIMITS["depth"]:
            raise ExpressionError(f"Expression is nested too deeply: more than {LIMITS['depth']} "
                                  "levels", _pos(node))
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _axis_name(axis: int, rank: int) -> str:
    return "a last axis" if axis == rank - 1 else f"axis {axis}"


def _lifter(run: Callable[[Env], Tensor], rank: int, to: int) -> Callable[[Env], Tensor]:
    """Give a batched value ``to - rank`` unit axes after the sample axis, so that it broadcasts
    against constants (which have no sample axis) by torch's trailing-axis rule."""
    if to <= rank:
        return run
    index = (slice(None),) + (None,) * (to - rank)
    return lambda env: run(env)[index]


class Compiler:
    """Compiles expressions over named ``variables`` (batched inputs, each with a per-sample shape)
    and ``data`` (float64 or int64 tensors). Expressions compiled by one compiler share its table
    of constants; ``program()`` hands that table to the run time.

    With ``legacy=True`` it keeps the older form's narrower rules (integer-literal indices on one
    axis, no ``@``).
    """

    def __init__(self, variables: Mapping[str, Sequence[int]], data: Mapping[str, Tensor], *,
                 legacy: bool = False):
        from .functions import FUNCTIONS

        self.functions = FUNCTIONS
        self.variables = {name: (i, tuple(shape)) for i, (name, shape) in enumerate(variables.items())}
        self.data = dict(data)
        self.legacy = legacy
        self.consts: list[Tensor] = []
        self._slots: dict[int, int] = {}

    # ----------------------------------------------------------------- helpers for the library
    def error(self, message: str, node: ast.AST) -> ExpressionError:
        return ExpressionError(message, _pos(node))

    def getter(self, v: Value) -> Callable[[Env], Tensor]:
        """The run-time accessor of ``v``: its run function, or its slot in the constant table."""
        if v.run is not None:
            return v.run
        key = id(v.const)
        if key not in self._slots:
            self._slots[key] = len(self.consts)
            self.consts.append(v.const)
        i = self._slots[key]
        return lambda env: env[1][i]

    def broadcast(self, shapes: Sequence[Sequence[int]], node: ast.AST) -> tuple[int, ...]:
        """numpy's broadcast of ``shapes``, or an error naming the two that clash."""
        out: list[int] = []
        seen: tuple[int, ...] = ()
        for shape in shapes:
            shape = tuple(shape)
            rank = max(len(out), len(shape))
            a = [1] * (rank - len(out)) + out
            b = [1] * (rank - len(shape)) + list(shape)
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if x != y and x != 1 and y != 1:
                    raise self.error(f"Operands have shapes {fmt_shape(seen)} and "
                                     f"{fmt_shape(shape)}: lengths {x} and {y}, which do not "
                                     "broadcast (lengths must match or one must be 1)", node)
                a[i] = max(x, y)
            out, seen = a, tuple(a)
        return tuple(out)

    def real(self, node: ast.AST) -> Value:
        """Compile ``node`` as a real value; integer constants become real."""
        v = self.visit(node)
        if v.kind == "bool":
            raise self.error("A comparison can only be the first argument of where()", node)
        if v.kind == "int":
            return Value(v.shape, "real", const=v.const.to(torch.float64))
        return v

    def const_int(self, node: ast.AST, what: str) -> int:
        """A single integer known at compile time (a literal or an integer expression of data)."""
        v = self.visit(node)
        if v.batched:
            raise self.error(f"{what} must be an integer known from the data; it cannot depend "
                             "on the parameters", node)
        if v.kind != "int":
            raise self.error(f"{what} must be an integer literal or integer data; got a "
                             f"{'comparison' if v.kind == 'bool' else 'real number'}", node)
        if v.shape:
            raise self.error(f"{what} must be a single integer; got shape {fmt_shape(v.shape)}",
                             node)
        return int(v.const)

    def apply(self, fn: Callable[..., Tensor], args: Sequence[Value], node: ast.AST, *,
              shape: Sequence[int] | None = None, kind: str = "real",
              ranks: Sequence[int | None] | None = None) -> Value:
        """The value ``fn(*args)``. ``fn`` takes tensors in their run-time layout and must treat
        axes from the right (or by negative index), so that it works with and without the sample
        axis. Batched arguments are lifted to the per-sample rank given in ``ranks`` (default: the
        rank of ``shape``, which defaults to the arguments' broadcast). Constant arguments alone
        give a constant, computed now."""
        shape = tuple(self.broadcast([a.shape for a in args], node) if shape is None else shape)
        if ranks is None:
            ranks = [len(shape)] * len(args)
        size = math.prod(shape)
        if all(not a.batched for a in args):
            if size > LIMITS["constant_value_size"]:
                raise self.error(f"A value of shape {fmt_shape(shape)} has {size} elements; at "
                                 f"most {LIMITS['constant_value_size']}", node)
            try:
                out = fn(*(a.const for a in args))
            except (RuntimeError, ValueError, IndexError) as e:
                raise self.error(f"Cannot compute this from the data: {e}", node) from None
            if tuple(out.shape) != shape:  # pragma: no cover - a bug in a shape rule
                raise RuntimeError(f"internal: {fmt_shape(out.shape)} != {fmt_shape(shape)}")
            if kind == "real" and out.dtype != torch.float64:
                out = out.to(torch.float64)
            return Value(shape, kind, const=out)
        if size > LIMITS["value_size"]:
            raise self.error(f"A value of shape {fmt_shape(shape)} has {size} elements per "
                             f"sample; at most {LIMITS['value_size']}", node)
        getters = []
        for a, rank in zip(args, ranks, strict=True):
            g = self.getter(a)
            if a.batched and rank is not None:
                g = _lifter(g, len(a.shape), rank)
            getters.append(g)
        if len(getters) == 1:
            (g0,) = getters
            return Value(shape, kind, run=lambda env: fn(g0(env)))
        if len(getters) == 2:
            g0, g1 = getters
            return Value(shape, kind, run=lambda env: fn(g0(env), g1(env)))
        return Value(shape, kind, run=lambda env: fn(*(g(env) for g in getters)))

    # ----------------------------------------------------------------- the AST visitors
    def visit(self, node: ast.AST) -> Value:
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            raise ExpressionError(f"{_describe(node)} is not allowed", _pos(node))
        return method(node)

    def visit_Expression(self, node: ast.Expression) -> Value:
        return self.visit(node.body)

    def visit_Constant(self, node: ast.Constant) -> Value:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.error(f"Only numbers are allowed as literals; got {type(v).__name__}", node)
        if isinstance(v, int):
            if abs(v) >= _INT_LIMIT:
                raise self.error("Number is too large", node)
            return Value((), "int", const=torch.tensor(v, dtype=torch.int64))
        if not math.isfinite(v):
            raise self.error("Number is not finite", node)
        return Value((), "real", const=torch.tensor(v, dtype=torch.float64))

    def visit_Name(self, node: ast.Name) -> Value:
        name = node.id
        if name in self.variables:
            i, shape = self.variables[name]
            return Value(shape, "real", run=lambda env: env[0][i])
        if name in self.data:
            t = self.data[name]
            kind = "int" if t.dtype == torch.int64 else "real"
            return Value(tuple(t.shape), kind, const=t)
        if name in self.functions:
            raise self.error(f"Function {name!r} must be called", node)
        known = ", ".join([*self.variables, *self.data])
        raise self.error(f"Unknown name {name!r}; known names: {known}", node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Value:
        if isinstance(node.op, ast.USub | ast.UAdd):
            x = self.visit(node.operand)
            if x.kind == "bool":
                raise self.error("A comparison can only be the first argument of where()",
                                 node.operand)
            if isinstance(node.op, ast.UAdd):
                return x
            return self.apply(torch.neg, [x], node, kind=x.kind)
        raise self.error(f"Operator '{_OPERATOR_SYMBOLS.get(type(node.op), '?')}' is not allowed",
                         node)

    def visit_BinOp(self, node: ast.BinOp) -> Value:
        if isinstance(node.op, ast.MatMult) and not self.legacy:
            from .functions import matmul

            return matmul(self, self.real(node.left), self.real(node.right), node)
        if type(node.op) not in _OPERATORS:
            symbol = _OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise self.error(f"Operator '{symbol}' is not allowed", node)
        _, op = _OPERATORS[type(node.op)]
        a, b = self.visit(node.left), self.visit(node.right)
        for side, v in ((node.left, a), (node.right, b)):
            if v.kind == "bool":
                raise self.error("A comparison can only be the first argument of where()", side)
        integer = a.kind == b.kind == "int" and isinstance(node.op, ast.Add | ast.Sub | ast.Mult)
        if not integer:
            a, b = self._as_real(a), self._as_real(b)
        return self.apply(op, [a, b], node, kind="int" if integer else "real")

    @staticmethod
    def _as_real(v: Value) -> Value:
        return Value(v.shape, "real", const=v.const.to(torch.float64)) if v.kind == "int" else v

    def visit_Compare(self, node: ast.Compare) -> Value:
        if len(node.ops) != 1:
            raise self.error("Chained comparisons are not allowed", node)
        if type(node.ops[0]) not in _COMPARISONS:
            raise self.error("Only < <= > >= == != comparisons are allowed", node)
        op = _COMPARISONS[type(node.ops[0])]
        a, b = self.real(node.left), self.real(node.comparators[0])
        return self.apply(op, [a, b], node, kind="bool")

    def visit_Call(self, node: ast.Call) -> Value:
        if not isinstance(node.func, ast.Name):
            raise self.error("Only the whitelisted functions can be called, by name", node)
        name = node.func.id
        function = self.functions.get(name)
        if function is None:
            raise self.error(f"Unknown function {name!r}; allowed: {', '.join(self.functions)}",
                             node)
        if node.keywords:
            raise self.error(f"{name}() takes no keyword arguments", node)
        lo, hi = function.arguments
        if not lo <= len(node.args) <= hi:
            takes = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise self.error(f"{name}() takes {takes} argument(s); got {len(node.args)}", node)
        return function.build(self, list(node.args), node)

    # ----------------------------------------------------------------- indexing
    def _legacy_index(self, index: ast.AST) -> None:
        """The older form allows integer literals on its one axis and nothing else."""
        parts = [index.lower, index.upper, index.step] if isinstance(index, ast.Slice) else [index]
        for part in parts:
            if part is None:
                continue
            inner = part.operand if (isinstance(part, ast.UnaryOp)
                                     and isinstance(part.op, ast.USub)) else part
            if not (isinstance(inner, ast.Constant) and isinstance(inner.value, int)
                    and not isinstance(inner.value, bool)):
                raise self.error("Indices and slice bounds must be integer literals", part)

    def visit_Subscript(self, node: ast.Subscript) -> Value:
        x = self.visit(node.value)
        if x.kind == "bool":
            raise self.error("A comparison can only be the first argument of where()", node.value)
        if not x.shape:
            raise self.error("Cannot index a scalar", node)
        if self.legacy:
            self._legacy_index(node.slice)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(items) > len(x.shape):
            raise self.error(f"Too many indices: {len(items)} for a value of shape "
                             f"{fmt_shape(x.shape)}", node)
        rank = len(x.shape)
        # Each item becomes ("int", i), ("slice", slice, picks or None) or ("array", LongTensor).
        parsed: list[tuple[str, Any]] = []
        for axis, item in enumerate(items):
            n = x.shape[axis]
            where = _axis_name(axis, rank)
            if isinstance(item, ast.Slice):
                bounds = [None if part is None else self.const_int(part, "A slice bound")
                          for part in (item.lower, item.upper, item.step)]
                if bounds[2] == 0:
                    raise self.error("Slice step cannot be zero", item)
                sl = slice(*bounds)
                picks = list(range(*sl.indices(n)))
                if not picks:
                    raise self.error(f"Slice selects nothing from {where} of length {n}", node)
                parsed.append(("slice", sl, picks if sl.step is not None and sl.step < 0 else None))
                continue
            v = self.visit(item)
            if v.batched:
                raise self.error("An index must be known from the data; it cannot depend on the "
                                 "parameters", item)
            if v.kind == "bool":
                raise self.error("Boolean masks cannot index; use where()", item)
            if v.kind != "int":
                raise self.error("Indices must be integer literals or integer data; got a real "
                                 "number", item)
            idx = v.const
            if idx.numel() and not bool(((idx >= -n) & (idx < n)).all()):
                bad = int(idx[(idx < -n) | (idx >= n)].reshape(-1)[0])
                raise self.error(f"Index {bad} is out of range for {where} of length {n}", node)
            idx = torch.remainder(idx, n)
            parsed.append(("int", int(idx)) if idx.ndim == 0 else ("array", idx))
        return self._index(x, parsed, node)

    def _index(self, x: Value, parsed: list[tuple[str, Any]], node: ast.AST) -> Value:
        rank = len(x.shape)
        arrays = [p[1] for p in parsed if p[0] == "array"]
        advanced = [i for i, p in enumerate(parsed) if p[0] == "array" or (arrays and p[0] == "int")]
        before: list[int] = []
        after: list[int] = []
        adv_shape: tuple[int, ...] = ()
        if arrays:
            adv_shape = self.broadcast([a.shape for a in arrays], node)
        adjacent = not advanced or advanced == list(range(advanced[0], advanced[-1] + 1))
        for i, p in enumerate(parsed):
            if p[0] == "slice":
                length = len(range(*p[1].indices(x.shape[i])))
                (before if not advanced or i < advanced[0] or not adjacent else after).append(length)
        after += list(x.shape[len(parsed):])
        if not arrays:
            shape = tuple(before + after)
        elif adjacent:
            shape = tuple(before + list(adv_shape) + after)
        else:
            shape = tuple(list(adv_shape) + before + after)
        # Negative steps become index_select (which keeps the axis, so numpy's placement rules for
        # the remaining items are unchanged); ints beside arrays become arrays, as numpy treats them.
        flips = [(i - rank, torch.tensor(p[2], dtype=torch.int64)) for i, p in enumerate(parsed)
                 if p[0] == "slice" and p[2] is not None]
        items: list[Any] = []
        for p in parsed:
            if p[0] == "slice":
                items.append(slice(None) if p[2] is not None else p[1])
            elif p[0] == "int" and arrays:
                items.append(torch.full((1,) * len(adv_shape), p[1], dtype=torch.int64))
            else:
                items.append(p[1])
        move = len(adv_shape) if arrays and not adjacent else 0

        def index(t: Tensor, batched: bool) -> Tensor:
            for dim, picks in flips:
                t = t.index_select(dim, picks.to(t.device))
            head = (slice(None),) if batched else ()
            key = head + tuple(i.to(t.device) if isinstance(i, Tensor) else i for i in items)
            out = t[key]
            # Arrays apart from each other go first (numpy), in front of the sample axis too.
            return out.movedim(move, 0) if batched and move else out

        flag = x.batched
        return self.apply(lambda t: index(t, flag), [x], node, shape=shape, kind=x.kind,
                          ranks=[None])

    # ----------------------------------------------------------------- entry points
    def compile(self, text: Any, field: str = "",
                check: Callable[[Value, ast.AST], None] | None = None) -> Value:
        """Compile one expression; errors name ``field`` (e.g. ``log_prob[2]``) and the position.
        ``check(value, root)`` may raise more errors about the whole expression."""
        prefix = f"{field}: " if field else ""
        if not isinstance(text, str):
            raise ExpressionError(f"{prefix}expected a string; got {type(text).__name__}")
        if len(text) > LIMITS["length"]:
            raise ExpressionError(f"{prefix}Expression is too long: {len(text)} characters, at "
                                  f"most {LIMITS['length']}")
        if not text.strip():
            raise ExpressionError(f"{prefix}Expression is empty")
        # Line breaks become spaces, so an expression may span lines without changing any offset;
        # positions are mapped back to (line, column) of the original text.
        flat = text.replace("\r", " ").replace("\n", " ")
        indent = len(flat) - len(flat.lstrip(" \t"))
        flat = flat[indent:]
        locate = _locator(text, flat, indent)
        try:
            tree = ast.parse(flat, mode="eval")
        except SyntaxError as e:
            raise ExpressionError(f"{prefix}Syntax error: {e.msg}",
                                  locate(max((e.offset or 1) - 1, 0), chars=True)) from None
        except (ValueError, RecursionError, MemoryError) as e:
            raise ExpressionError(f"{prefix}Cannot parse the expression: "
                                  f"{type(e).__name__}") from None
        try:
            _check_size(tree)
            out = self.visit(tree)
            if check is not None:
                check(out, tree.body)
            return out
        except ExpressionError as e:
            message = str(e).rsplit(" at line ", 1)[0] if e.position else str(e)
            position = locate(e.position[1]) if e.position else None
            raise ExpressionError(f"{prefix}{message}", position) from None
        except RecursionError:
            raise ExpressionError(f"{prefix}Expression is nested too deeply") from None

    def program(self) -> Program:
        return Program(self.consts)


class Program:
    """The constant table of a compiler, materialized once per dtype and device. Real constants
    take the run-time dtype; integer and boolean ones keep theirs."""

    def __init__(self, consts: list[Tensor]):
        self._raw = consts
        self._cache: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}

    def consts(self, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = [c.to(device=device, dtype=dtype) if c.is_floating_point()
                                else c.to(device) for c in self._raw]
        return self._cache[key]


# --------------------------------------------------------------------------- the older form
def _constants(constants: Mapping[str, Any] | None, reserved: Mapping[str, Any]) -> dict[str, Tensor]:
    if constants is None:
        return {}
    if not isinstance(constants, Mapping):
        raise ExpressionError(f"constants: expected an object of name -> number or list; got "
                              f"{type(constants).__name__}")
    if len(constants) > LIMITS["constants"]:
        raise ExpressionError(f"constants: at most {LIMITS['constants']}; got {len(constants)}")
    out: dict[str, Tensor] = {}
    total = 0
    for name, value in constants.items():
        if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
            raise ExpressionError(f"constants: {name!r} is not a valid name (a letter, then up to "
                                  "63 letters, digits or underscores)")
        if name == "z" or name in reserved:
            raise ExpressionError(f"constants: {name!r} is reserved")
        items = value if isinstance(value, list | tuple) else [value]
        if isinstance(value, list | tuple) and not 1 <= len(items) <= LIMITS["constant_size"]:
            raise ExpressionError(f"constants: {name!r} must have 1 to "
                                  f"{LIMITS['constant_size']} entries; got {len(items)}")
        for v in items:
            if (isinstance(v, bool) or not isinstance(v, int | float)
                    or not math.isfinite(float(v))):
                raise ExpressionError(f"constants: {name!r} must be a finite number or a flat "
                                      f"list of finite numbers; got {v!r}")
        total += len(items)
        if total > LIMITS["total_constant_size"]:
            raise ExpressionError(f"constants: more than {LIMITS['total_constant_size']} numbers "
                                  "in all")
        # The older form's constants are all real, as they always were.
        out[name] = torch.tensor([float(v) for v in items] if isinstance(value, list | tuple)
                                 else float(value), dtype=torch.float64)
    return out


def compile_expression(
    text: str, dim: int, constants: Mapping[str, Any] | None = None
) -> Callable[[Tensor], Tensor]:
    """Compile ``text`` into ``f(z) -> Tensor (N,)`` for ``z`` of shape ``(N, dim)`` (the older
    form: see the module docstring). The result has ``z``'s dtype.

    Raises ``ExpressionError`` (with ``position`` when it points into the text) for anything
    outside the language.

    Example:
        >>> import torch
        >>> f = compile_expression("-0.5 * sum((z - mu) ** 2)", 2, {"mu": [1.0, 2.0]})
        >>> f(torch.tensor([[1.0, 2.0], [0.0, 2.0]]))
        tensor([-0.0000, -0.5000])
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= LIMITS["dim"]:
        raise ExpressionError(f"dim: expected an integer in [1, {LIMITS['dim']}]; got {dim!r}")
    if not isinstance(text, str):
        raise ExpressionError(f"log_prob: expected a string; got {type(text).__name__}")
    compiler = Compiler({"z": (dim,)}, {}, legacy=True)
    compiler.data = _constants(constants, compiler.functions)

    def one_value(root: Value, node: ast.AST) -> None:
        if root.kind == "bool":
            raise compiler.error("The expression is a comparison; it must give a number per "
                                 "sample", node)
        if math.prod(root.shape) != 1:
            raise compiler.error(f"The expression gives {math.prod(root.shape)} values per "
                                 "sample; log_prob must give one (reduce it with sum, norm or "
                                 "logsumexp)", node)

    root = compiler.compile(text, check=one_value)
    program = compiler.program()
    run = compiler.getter(root) if root.batched else None
    value = root.const

    def log_prob(z: Tensor) -> Tensor:
        if run is None:
            return value.to(device=z.device, dtype=z.dtype).reshape(()).expand(z.shape[0])
        out = run(((z,), program.consts(z.dtype, z.device)))
        return out.reshape(z.shape[0]).to(z.dtype)

    return log_prob


def from_expression(dim: int, log_prob: str, constants: Mapping[str, Any] | None = None) -> Target:
    """A ``Target`` from an expression in the older form (see the module docstring); its ``log_z``
    is unknown.

    Example:
        >>> import torch
        >>> t = from_expression(2, "-0.5*sum((z - mu)**2)", {"mu": [1.0, -1.0]})
        >>> t.log_prob(torch.tensor([[1.0, -1.0]]))
        tensor([-0.])
    """
    fn = compile_expression(log_prob, dim, constants)
    return Target("expression", dim, fn, description=log_prob,
                  spec={"dim": dim, "log_prob": log_prob, "constants": dict(constants or {})})


def __getattr__(name: str) -> Any:
    # FUNCTIONS lives with the library; importing it here eagerly would be circular.
    if name == "FUNCTIONS":
        from .functions import FUNCTIONS

        return FUNCTIONS
    raise AttributeError(name)

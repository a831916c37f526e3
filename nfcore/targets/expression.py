"""The expression language: a client's ``log p~(z)`` as text, compiled to torch ops, never evaluated.

The text is parsed with ``ast.parse(mode="eval")`` and every node is checked against a whitelist:

- numbers, the variable ``z``, and named constants (a number or a list of numbers);
- ``+ - * / **``, unary ``-`` and ``+``, and one comparison (``< <= > >= == !=``) as the first argument
  of ``where``;
- indexing and slicing of the last axis with integer literals: ``z[0]``, ``z[2:]``, ``y[-1]``;
- the functions exp, log, log1p, expm1, sqrt, abs, sin, cos, tanh, sigmoid, softplus (element-wise),
  logsumexp, sum, norm (reduce the last axis), where(cond, a, b), minimum(a, b), maximum(a, b).

Anything else (attributes, subscripts of calls, lambdas, comprehensions, keywords, strings, unknown
names or functions) is an ``ExpressionError`` naming the problem and its (line, column).

Every value has a last axis of known length. ``z`` has ``dim``, ``z[i]`` and reductions have 1 (one
value per sample) and a vector constant has its length; numbers and scalar constants have none.
Operands broadcast when their lengths agree or one of them is 1, so ``y - z[0]`` subtracts the
per-sample ``z[0]`` from each entry of ``y``. Lengths are checked at compile time, so shape errors
carry a position too. The whole expression must give one value per sample.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ExpressionError
from .base import Target

__all__ = ["compile_expression", "from_expression", "FUNCTIONS", "LIMITS"]

#: Size bounds on expressions and constants.
LIMITS = {"length": 10_000, "nodes": 2_000, "depth": 100, "constants": 64,
          "constant_size": 10_000, "total_constant_size": 100_000, "dim": 4096}

_ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp, "log": torch.log, "log1p": torch.log1p, "expm1": torch.expm1,
    "sqrt": torch.sqrt, "abs": torch.abs, "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "softplus": F.softplus,
}
_REDUCE: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": lambda x: x.sum(-1, keepdim=True),
    "norm": lambda x: torch.linalg.vector_norm(x, dim=-1, keepdim=True),
    "logsumexp": lambda x: torch.logsumexp(x, dim=-1, keepdim=True),
}
_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "minimum": torch.minimum, "maximum": torch.maximum,
}
#: Function name -> number of arguments.
FUNCTIONS: dict[str, int] = {**dict.fromkeys(_ELEMENTWISE, 1), **dict.fromkeys(_REDUCE, 1),
                             **dict.fromkeys(_BINARY, 2), "where": 3}

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

# A compiled node reads the per-call environment: z and the materialized constants and literals.
Env = tuple[Tensor, list[Tensor]]


@dataclass(frozen=True)
class _Node:
    run: Callable[[Env], Tensor]
    width: int | None  # length of the last axis; None for a scalar with no axis
    boolean: bool = False


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


def _broadcast(widths: list[int | None], node: ast.AST) -> int | None:
    out: int | None = None
    for w in widths:
        if w is None or w == out:
            continue
        if out is None or out == 1:
            out = w
        elif w != 1:
            raise ExpressionError(f"Operands have last-axis lengths {out} and {w}, which do not "
                                  "broadcast (lengths must match or one must be 1)", _pos(node))
    return out


class _Compiler:
    def __init__(self, dim: int, constants: Mapping[str, Tensor]):
        self.dim = dim
        self.names = {name: i for i, name in enumerate(constants)}
        self.widths = {name: (t.shape[0] if t.ndim else None) for name, t in constants.items()}
        self.values: list[Tensor] = list(constants.values())

    def literal(self, value: float) -> _Node:
        i = len(self.values)
        self.values.append(torch.tensor(value, dtype=torch.float64))
        return _Node(lambda env: env[1][i], None)

    def real(self, node: ast.AST) -> _Node:
        out = self.visit(node)
        if out.boolean:
            raise ExpressionError("A comparison can only be the first argument of where()",
                                  _pos(node))
        return out

    def visit(self, node: ast.AST) -> _Node:
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            raise ExpressionError(f"{_describe(node)} is not allowed", _pos(node))
        return method(node)

    def visit_Expression(self, node: ast.Expression) -> _Node:
        return self.visit(node.body)

    def visit_Constant(self, node: ast.Constant) -> _Node:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ExpressionError(f"Only numbers are allowed as literals; got {type(v).__name__}",
                                  _pos(node))
        try:
            value = float(v)
        except OverflowError:
            raise ExpressionError("Number is too large", _pos(node)) from None
        if not math.isfinite(value):
            raise ExpressionError("Number is not finite", _pos(node))
        return self.literal(value)

    def visit_Name(self, node: ast.Name) -> _Node:
        name = node.id
        if name == "z":
            return _Node(lambda env: env[0], self.dim)
        if name in self.names:
            i = self.names[name]
            return _Node(lambda env: env[1][i], self.widths[name])
        if name in FUNCTIONS:
            raise ExpressionError(f"Function {name!r} must be called", _pos(node))
        known = ", ".join(["z", *self.names]) or "z"
        raise ExpressionError(f"Unknown name {name!r}; known names: {known}", _pos(node))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> _Node:
        if isinstance(node.op, ast.USub):
            x = self.real(node.operand)
            return _Node(lambda env: torch.neg(x.run(env)), x.width)
        if isinstance(node.op, ast.UAdd):
            return self.real(node.operand)
        raise ExpressionError(f"Operator '{_OPERATOR_SYMBOLS.get(type(node.op), '?')}' is not "
                              "allowed", _pos(node))

    def visit_BinOp(self, node: ast.BinOp) -> _Node:
        if type(node.op) not in _OPERATORS:
            symbol = _OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise ExpressionError(f"Operator '{symbol}' is not allowed", _pos(node))
        _, op = _OPERATORS[type(node.op)]
        a, b = self.real(node.left), self.real(node.right)
        width = _broadcast([a.width, b.width], node)
        return _Node(lambda env: op(a.run(env), b.run(env)), width)

    def visit_Compare(self, node: ast.Compare) -> _Node:
        if len(node.ops) != 1:
            raise ExpressionError("Chained comparisons are not allowed", _pos(node))
        if type(node.ops[0]) not in _COMPARISONS:
            raise ExpressionError("Only < <= > >= == != comparisons are allowed", _pos(node))
        op = _COMPARISONS[type(node.ops[0])]
        a, b = self.real(node.left), self.real(node.comparators[0])
        width = _broadcast([a.width, b.width], node)
        return _Node(lambda env: op(a.run(env), b.run(env)), width, boolean=True)

    def visit_Call(self, node: ast.Call) -> _Node:
        if not isinstance(node.func, ast.Name):
            raise ExpressionError("Only the whitelisted functions can be called, by name",
                                  _pos(node))
        name = node.func.id
        if name not in FUNCTIONS:
            raise ExpressionError(f"Unknown function {name!r}; allowed: {', '.join(FUNCTIONS)}",
                                  _pos(node))
        if node.keywords:
            raise ExpressionError(f"{name}() takes no keyword arguments", _pos(node))
        if len(node.args) != FUNCTIONS[name]:
            raise ExpressionError(f"{name}() takes {FUNCTIONS[name]} argument(s); got "
                                  f"{len(node.args)}", _pos(node))
        if name == "where":
            c = self.visit(node.args[0])
            if not c.boolean:
                raise ExpressionError("The first argument of where() must be a comparison",
                                      _pos(node.args[0]))
            a, b = self.real(node.args[1]), self.real(node.args[2])
            width = _broadcast([c.width, a.width, b.width], node)
            return _Node(lambda env: torch.where(c.run(env), a.run(env), b.run(env)), width)
        args = [self.real(arg) for arg in node.args]
        if name in _BINARY:
            f2, (a, b) = _BINARY[name], args
            return _Node(lambda env: f2(a.run(env), b.run(env)), _broadcast([a.width, b.width], node))
        (x,) = args
        if name in _ELEMENTWISE:
            f1 = _ELEMENTWISE[name]
            return _Node(lambda env: f1(x.run(env)), x.width)
        if x.width is None:  # a reduction of a scalar constant: keep it scalar
            f0 = {"sum": lambda t: t, "norm": torch.abs, "logsumexp": lambda t: t}[name]
            return _Node(lambda env: f0(x.run(env)), None)
        fr = _REDUCE[name]
        return _Node(lambda env: fr(x.run(env)), 1)

    def _int(self, node: ast.AST | None) -> int | None:
        if node is None:
            return None
        sign = 1
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sign, node = -1, node.operand
        if (isinstance(node, ast.Constant) and isinstance(node.value, int)
                and not isinstance(node.value, bool)):
            return sign * node.value
        raise ExpressionError("Indices and slice bounds must be integer literals", _pos(node))

    def visit_Subscript(self, node: ast.Subscript) -> _Node:
        x = self.real(node.value)
        if x.width is None:
            raise ExpressionError("Cannot index a scalar", _pos(node))
        n, index = x.width, node.slice
        if isinstance(index, ast.Slice):
            lo, hi, step = self._int(index.lower), self._int(index.upper), self._int(index.step)
            if step == 0:
                raise ExpressionError("Slice step cannot be zero", _pos(index))
            sl = slice(lo, hi, step)
            width = len(range(*sl.indices(n)))
            if width == 0:
                raise ExpressionError(f"Slice selects nothing from a last axis of length {n}",
                                      _pos(node))
            if step is not None and step < 0:
                picks = list(range(*sl.indices(n)))
                return _Node(lambda env: x.run(env)[..., picks], width)
            return _Node(lambda env: x.run(env)[..., sl], width)
        i = self._int(index)
        if not -n <= i < n:
            raise ExpressionError(f"Index {i} is out of range for a last axis of length {n}",
                                  _pos(node))
        j = i % n
        return _Node(lambda env: x.run(env)[..., j : j + 1], 1)


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


def _constants(constants: Mapping[str, Any] | None) -> dict[str, Tensor]:
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
        if name == "z" or name in FUNCTIONS:
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
        out[name] = torch.tensor([float(v) for v in items] if isinstance(value, list | tuple)
                                 else float(value), dtype=torch.float64)
    return out


def compile_expression(
    text: str, dim: int, constants: Mapping[str, Any] | None = None
) -> Callable[[Tensor], Tensor]:
    """Compile ``text`` into ``f(z) -> Tensor (N,)`` for ``z`` of shape ``(N, dim)``.

    Raises ``ExpressionError`` (with ``position`` when it points into the text) for anything
    outside the language.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= LIMITS["dim"]:
        raise ExpressionError(f"dim: expected an integer in [1, {LIMITS['dim']}]; got {dim!r}")
    if not isinstance(text, str):
        raise ExpressionError(f"log_prob: expected a string; got {type(text).__name__}")
    if len(text) > LIMITS["length"]:
        raise ExpressionError(f"Expression is too long: {len(text)} characters, at most "
                              f"{LIMITS['length']}")
    if not text.strip():
        raise ExpressionError("Expression is empty")
    values = _constants(constants)
    # Line breaks become spaces, so an expression may span lines without changing any offset;
    # positions are mapped back to (line, column) of the original text.
    flat = text.replace("\r", " ").replace("\n", " ")
    indent = len(flat) - len(flat.lstrip(" \t"))
    flat = flat[indent:]
    locate = _locator(text, flat, indent)
    try:
        tree = ast.parse(flat, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"Syntax error: {e.msg}", locate(max((e.offset or 1) - 1, 0),
                                                               chars=True)) from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"Cannot parse the expression: {type(e).__name__}") from None
    try:
        _check_size(tree)
        compiler = _Compiler(dim, values)
        root = compiler.visit(tree)
        if root.boolean:
            raise ExpressionError("The expression is a comparison; it must give a number per "
                                  "sample", _pos(tree.body))
        if root.width not in (None, 1):
            raise ExpressionError(f"The expression gives {root.width} values per sample; log_prob "
                                  "must give one (reduce it with sum, norm or logsumexp)",
                                  _pos(tree.body))
    except ExpressionError as e:
        if e.position is None:
            raise
        message = str(e).rsplit(" at line ", 1)[0]
        raise ExpressionError(message, locate(e.position[1])) from None
    materialized: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    raw = compiler.values

    def log_prob(z: Tensor) -> Tensor:
        key = (z.dtype, z.device)
        if key not in materialized:
            materialized[key] = [v.to(dtype=z.dtype, device=z.device) for v in raw]
        out = root.run((z, materialized[key]))
        if out.ndim == 0:
            return out.expand(z.shape[0])
        return out.broadcast_to((z.shape[0], 1))[:, 0]

    return log_prob


def from_expression(dim: int, log_prob: str, constants: Mapping[str, Any] | None = None) -> Target:
    """A ``Target`` from an expression (see the module docstring); its ``log_z`` is unknown.

    Example:
        >>> import torch
        >>> t = from_expression(2, "-0.5*sum((z - mu)**2)", {"mu": [1.0, -1.0]})
        >>> t.log_prob(torch.tensor([[1.0, -1.0]]))
        tensor([-0.])
    """
    fn = compile_expression(log_prob, dim, constants)
    return Target("expression", dim, fn, description=log_prob,
                  spec={"dim": dim, "log_prob": log_prob, "constants": dict(constants or {})})

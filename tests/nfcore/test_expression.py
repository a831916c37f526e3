"""The expression language: semantics against hand-written torch, precise errors, and a fuzz that
nothing outside the whitelist is ever evaluated."""

from __future__ import annotations

import ast
import builtins
import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfcore.errors import ExpressionError, TargetError
from nfcore.targets import compile_expression, from_expression
from nfcore.targets.expression import FUNCTIONS, LIMITS

EIGHT_SCHOOLS = {
    "dim": 10,
    "log_prob": "-0.5*(z[0]/5)**2 - log1p((exp(z[1])/5)**2) + z[1] - 0.5*sum(z[2:]**2) - "
                "0.5*sum(((y - z[0] - exp(z[1])*z[2:])/sigma)**2)",
    "constants": {"y": [28, 8, -3, 7, -1, 1, 18, 12], "sigma": [15, 10, 16, 11, 9, 11, 10, 18]},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_eight_schools_matches_hand_written_torch():
    target = from_expression(**EIGHT_SCHOOLS)
    z = torch.randn(64, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor(EIGHT_SCHOOLS["constants"]["y"], dtype=torch.float64)
    sigma = torch.tensor(EIGHT_SCHOOLS["constants"]["sigma"], dtype=torch.float64)
    mu, tau, theta = z[:, :1], torch.exp(z[:, 1:2]), z[:, 2:]
    want = (-0.5 * (z[:, 0] / 5) ** 2 - torch.log1p((tau[:, 0] / 5) ** 2) + z[:, 1]
            - 0.5 * (theta**2).sum(-1) - 0.5 * (((y - mu - tau * theta) / sigma) ** 2).sum(-1))
    got = target.log_prob(z)
    assert got.shape == (64,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    assert target.dim == 10 and target.log_z is None


def test_float32_input_gives_float32_and_gradients_flow():
    target = from_expression(**EIGHT_SCHOOLS)
    z = torch.randn(5, 10, requires_grad=True)
    out = target.log_prob(z)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


Z = torch.tensor([[0.5, -1.5, 2.0], [-0.3, 0.7, 1.1]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("text", "reference"),
    [
        ("exp(z[0])", lambda z: torch.exp(z[:, 0])),
        ("log(abs(z[1]))", lambda z: torch.log(z[:, 1].abs())),
        ("log1p(z[2]) + expm1(z[0])", lambda z: torch.log1p(z[:, 2]) + torch.expm1(z[:, 0])),
        ("sqrt(z[2]) * sin(z[0]) - cos(z[1])",
         lambda z: z[:, 2].sqrt() * z[:, 0].sin() - z[:, 1].cos()),
        ("tanh(z[0]) + sigmoid(z[1]) + softplus(z[2])",
         lambda z: z[:, 0].tanh() + z[:, 1].sigmoid() + torch.nn.functional.softplus(z[:, 2])),
        ("logsumexp(z)", lambda z: torch.logsumexp(z, -1)),
        ("norm(z[:2])", lambda z: torch.linalg.vector_norm(z[:, :2], dim=-1)),
        ("sum(z[::2])", lambda z: z[:, 0] + z[:, 2]),
        ("sum(z[::-1] * w)", lambda z: z[:, 2] + 2 * z[:, 1] + 3 * z[:, 0]),
        ("z[-1] - z[-3]", lambda z: z[:, 2] - z[:, 0]),
        ("where(z[0] > 0, z[1], -z[2])", lambda z: torch.where(z[:, 0] > 0, z[:, 1], -z[:, 2])),
        ("where(z[0] <= c, 1, 2)", lambda z: torch.where(z[:, 0] <= 0.1, 1.0, 2.0)),
        ("minimum(z[0], z[1]) + maximum(z[1], c)",
         lambda z: torch.minimum(z[:, 0], z[:, 1]) + torch.maximum(z[:, 1], torch.tensor(0.1))),
        ("-(-z[0]) ** 2 + +z[1]", lambda z: -(z[:, 0] ** 2) + z[:, 1]),
        ("2 ** 3 / 4", lambda z: torch.full((z.shape[0],), 2.0, dtype=z.dtype)),
        ("sum(w) * z[0]", lambda z: 6 * z[:, 0]),
        ("sum(z - w)", lambda z: (z - torch.tensor([1.0, 2.0, 3.0], dtype=z.dtype)).sum(-1)),
        ("w[1] * z[0]\n + 1", lambda z: 2 * z[:, 0] + 1),
    ],
)
def test_semantics_match_torch(text, reference):
    f = compile_expression(text, 3, {"c": 0.1, "w": [1, 2, 3]})
    torch.testing.assert_close(f(Z), reference(Z).to(Z.dtype))


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("z.__class__", "attribute access is not allowed", (1, 0)),
        ("z[0] + z.real", "attribute access is not allowed", (1, 7)),
        ("__import__('os')", "Unknown function '__import__'", (1, 0)),
        ("eval('1')", "Unknown function 'eval'", (1, 0)),
        ("(lambda: 1)()", "Only the whitelisted functions", (1, 0)),
        ("sum(lambda: 1)", "lambda is not allowed", (1, 4)),
        ("sum([x for x in z])", "a comprehension is not allowed", (1, 4)),
        ("foo", "Unknown name 'foo'", (1, 0)),
        ("z[0] +\n bar", "Unknown name 'bar'", (2, 1)),
        ("exp", "Function 'exp' must be called", (1, 0)),
        ("exp(z[0], z[1])", "exp() takes 1 argument(s); got 2", (1, 0)),
        ("exp(x=z[0])", "takes no keyword arguments", (1, 0)),
        ("'abc'", "Only numbers are allowed as literals", (1, 0)),
        ("True", "Only numbers are allowed", (1, 0)),
        ("z[0] % 2", "Operator '%' is not allowed", (1, 0)),
        ("z[0] // 2", "Operator '//' is not allowed", (1, 0)),
        ("z[0] @ z[1]", "Operator '@' is not allowed", (1, 0)),
        ("not z[0]", "Operator 'not' is not allowed", (1, 0)),
        ("z[0] and z[1]", "and/or is not allowed", (1, 0)),
        ("z[0] if z[1] else 0", "if-expression (use where)", (1, 0)),
        ("z[0] < z[1] < 2", "Chained comparisons", (1, 0)),
        ("z[0] < 1", "is a comparison", (1, 0)),
        ("exp(z[0] < 1)", "A comparison can only be the first argument of where()", (1, 4)),
        ("where(z[0], 1, 2)", "first argument of where() must be a comparison", (1, 6)),
        ("z[3]", "Index 3 is out of range for a last axis of length 3", (1, 0)),
        ("z[-4]", "Index -4 is out of range", (1, 0)),
        ("sum(z[i])", "integer literals", (1, 6)),
        ("z[0.5]", "integer literals", (1, 2)),
        ("z[0, 1]", "integer literals", (1, 2)),
        ("sum(z[3:])", "Slice selects nothing", (1, 4)),
        ("sum(z[::0])", "step cannot be zero", (1, 6)),
        ("c[0]", "Cannot index a scalar", (1, 0)),
        ("z", "gives 3 values per sample", (1, 0)),
        ("sum(z[:2] + w)", "lengths 2 and 3, which do not broadcast", (1, 4)),
        ("z[0] + (", "Syntax error", (1, 7)),
        ("z[0] +\n (z[1] $ 2)", "Syntax error", (2, 7)),
        ("1e999 * z[0]", "Number is not finite", (1, 0)),
        ("9" * 400, "Number is too large", (1, 0)),
        ("z[0]; z[1]", "Syntax error", None),
        ("[z[0]][0]", "a list literal is not allowed", (1, 0)),
        ("f'{z}'", "an f-string is not allowed", (1, 0)),
        ("(y := 1)", "assignment (:=) is not allowed", (1, 1)),
        ("z[0] is z[1]", "Only < <= > >= == != comparisons", (1, 0)),
        ("z[0] in z", "Only < <= > >= == != comparisons", (1, 0)),
        ("   foo", "Unknown name 'foo'", (1, 3)),
    ],
)
def test_hostile_or_malformed_input_names_problem_and_position(text, message, position):
    with pytest.raises(ExpressionError) as info:
        compile_expression(text, 3, {"c": 0.1, "w": [1, 2, 3]})
    err = info.value
    assert isinstance(err, TargetError)
    if message is not None:
        assert message in str(err)
    if position is not None:
        assert err.position == position
        assert f"line {position[0]}, column {position[1]}" in str(err)


def test_is_and_in_are_rejected():
    for text in ("z[0] is z[1]", "z[0] in z", "z[0] not in z"):
        with pytest.raises(ExpressionError):
            compile_expression(text, 3)


@pytest.mark.parametrize(
    ("constants", "message"),
    [
        ({"y": "abc"}, "finite number or a flat list"),
        ({"y": [1, [2]]}, "finite number or a flat list"),
        ({"y": [1, float("nan")]}, "finite number"),
        ({"y": True}, "finite number"),
        ({"y": []}, "must have 1 to"),
        ({"y": [0.0] * (LIMITS["constant_size"] + 1)}, "must have 1 to"),
        ({"__class__": 1}, "not a valid name"),
        ({"z": 1}, "reserved"),
        ({"exp": 1}, "reserved"),
        ({"lambda": 1}, "not a valid name"),
        ({1: 2}, "not a valid name"),
        ({f"c{i}": 1 for i in range(LIMITS["constants"] + 1)}, "at most"),
        ([1, 2], "expected an object"),
    ],
)
def test_bad_constants_are_rejected(constants, message):
    with pytest.raises(ExpressionError, match=message.replace("(", r"\(")):
        compile_expression("z[0]", 3, constants)


def test_wrong_constant_shape_is_a_compile_time_error_with_position():
    bad = {**EIGHT_SCHOOLS, "constants": {"y": [28, 8, -3], "sigma": [15] * 8}}
    with pytest.raises(ExpressionError, match="lengths 3 and 8") as info:
        from_expression(**bad)
    assert info.value.position is not None


@pytest.mark.parametrize("dim", [0, -1, True, 1.5, LIMITS["dim"] + 1])
def test_bad_dim(dim):
    with pytest.raises(ExpressionError, match="dim"):
        compile_expression("z[0]", dim)


def test_size_and_depth_are_bounded():
    with pytest.raises(ExpressionError, match="too long"):
        compile_expression("z[0]+" * 3000 + "1", 3)
    with pytest.raises(ExpressionError, match="too large"):
        balanced = "1"
        for _ in range(10):
            balanced = f"({balanced}+{balanced})"
        compile_expression(balanced, 3)
    with pytest.raises(ExpressionError, match="nested too deeply"):
        compile_expression("exp(" * 120 + "z[0]" + ")" * 120, 3)
    compile_expression("+".join(["z[0]"] * 90), 3)  # a long flat sum is fine
    with pytest.raises(ExpressionError):
        compile_expression("(" * 1000 + "z[0]" + ")" * 1000, 3)
    with pytest.raises(ExpressionError):
        compile_expression("-" * 9000 + "z[0]", 3)
    with pytest.raises(ExpressionError, match="empty"):
        compile_expression("  ", 3)
    with pytest.raises(ExpressionError, match="expected a string"):
        compile_expression(b"z[0]", 3)
    with pytest.raises(ExpressionError):
        compile_expression("z[0]\x00", 3)


def test_scalar_expression_broadcasts_to_rows():
    f = compile_expression("-0.5 * c", 2, {"c": 4})
    torch.testing.assert_close(f(torch.zeros(3, 2)), torch.full((3,), -2.0))


# --------------------------------------------------------------------------- fuzzing
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name,
                  ast.Load, ast.Constant, ast.Subscript, ast.Slice, ast.Add, ast.Sub, ast.Mult,
                  ast.Div, ast.Pow, ast.USub, ast.UAdd, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq,
                  ast.NotEq)
_CONSTANTS = {"c": 0.5, "w": [1.0, -2.0, 3.0]}
_ALLOWED_NAMES = {"z", *_CONSTANTS, *FUNCTIONS}

_leaves = st.sampled_from([
    "z", "z[0]", "z[1]", "z[-1]", "z[1:]", "z[:2]", "z[::2]", "c", "w", "w[2]", "1", "2.5", "0",
    "1e3", "-3", "x", "__import__", "os", "open", "'s'", "b'x'", "None", "True", "...",
    "z.__class__", "().__class__.__bases__", "globals()", "lambda: 0", "[q for q in z]",
    "{}", "[1]", "(1, 2)", "z[c]", "z[0.5]", "z[10]", "*z",
])
_ops = st.sampled_from(["+", "-", "*", "/", "**", "%", "//", "@", "and", "or", "<", "==", ">=",
                        "is", "in", "|", "&"])
_functions = st.sampled_from([*FUNCTIONS, "eval", "exec", "getattr", "print", "compile", "type",
                              "__import__", "vars"])


def _grow(children):
    return st.one_of(
        st.tuples(children, _ops, children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(_functions, st.lists(children, min_size=0, max_size=3)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.tuples(children, st.sampled_from(["[0]", "[1:]", "[::-1]", ".real", ".__dict__",
                                             "()", "[0][0]"])).map("".join),
        st.tuples(st.sampled_from(["-", "+", "not ", "~", "await ", "lambda: "]), children).map(
            "".join),
        st.tuples(children, children, children).map(
            lambda t: f"where({t[0]} > {t[1]}, {t[1]}, {t[2]})"),
        st.tuples(children, children).map(lambda t: f"({t[0]} if {t[1]} else 1)"),
    )


_expressions = st.recursive(_leaves, _grow, max_leaves=12)


@contextlib.contextmanager
def _no_code_execution():
    """Make eval/exec/__import__ fail loudly and allow compile() only to build an AST."""
    real_compile, real_import = builtins.compile, builtins.__import__
    calls: list[str] = []

    def guarded_compile(source, filename, mode, flags=0, *args, **kwargs):
        if not flags & ast.PyCF_ONLY_AST:
            calls.append(f"compile({source!r})")
            raise AssertionError("compile() to a code object was called")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return f

    def guarded_import(name, *args, **kwargs):
        if name in ("os", "subprocess", "sys", "shutil"):
            calls.append(f"import {name}")
            raise AssertionError(f"import {name}")
        return real_import(name, *args, **kwargs)

    saved = {k: getattr(builtins, k) for k in ("eval", "exec")}
    builtins.eval, builtins.exec = forbidden("eval"), forbidden("exec")
    builtins.compile, builtins.__import__ = guarded_compile, guarded_import
    try:
        yield calls
    finally:
        builtins.compile, builtins.__import__ = real_compile, real_import
        builtins.eval, builtins.exec = saved["eval"], saved["exec"]


def _check_only_whitelist(text: str) -> None:
    z = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(4, 3)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    with _no_code_execution() as calls:
        try:
            f = compile_expression(text, 3, _CONSTANTS)
        except ExpressionError:
            f = None
        out = f(z) if f is not None else None
    assert not calls, calls
    if f is None:
        return
    # It compiled, so the parse tree uses nothing outside the whitelist.
    assert tree is not None
    for node in ast.walk(tree):
        assert isinstance(node, _ALLOWED_NODES), f"{type(node).__name__} got through: {text!r}"
        if isinstance(node, ast.Name):
            assert node.id in _ALLOWED_NAMES, text
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS, text
            assert not node.keywords
        if isinstance(node, ast.Constant):
            assert type(node.value) in (int, float), text
    assert out.shape == (4,) and out.dtype == torch.float64


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_expressions)
def test_fuzz_grammar_only_whitelist_is_evaluated(text):
    _check_only_whitelist(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("z[]0123456789().+-*/<>=:,_ abcdefghijklmnopqrstuvwxy"
                                             "'\"\n\\@%!~")), max_size=60))
def test_fuzz_raw_text_only_raises_expression_error(text):
    _check_only_whitelist(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_unicode_text_only_raises_expression_error(text):
    _check_only_whitelist(text)


def test_fuzz_guard_would_catch_code_execution():
    with _no_code_execution() as calls:
        patched_eval, patched_compile = builtins.eval, builtins.compile  # the guarded versions
        with pytest.raises(AssertionError):
            patched_eval("1")
        with pytest.raises(AssertionError):
            patched_compile("1", "<x>", "eval")
    assert calls == ["eval", "compile('1')"]


def test_math_constants_are_just_numbers():
    f = compile_expression("3.141592653589793 * z[0]", 1)
    torch.testing.assert_close(f(torch.ones(2, 1, dtype=torch.float64)),
                               torch.full((2,), math.pi, dtype=torch.float64))

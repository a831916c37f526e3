"""The model language: the contract's example, numpy semantics of indexing and broadcasting,
errors that name the problem and its position, size bounds, and fuzzing of the grammar and of
the JSON around it."""

from __future__ import annotations

import ast
import builtins
import contextlib
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nfcore
from nfcore.errors import ExpressionError, TargetError
from nfcore.targets import ModelTarget, from_spec
from nfcore.targets.expression import LIMITS
from nfcore.targets.functions import FUNCTIONS
from nfcore.targets.model import MODEL_LIMITS

from .test_model_functions import N, close, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

EIGHT_SCHOOLS = {
    "params": {"mu": {}, "tau": {"lower": 0}, "theta_tilde": {"shape": [8]}},
    "data": {"y": [28, 8, -3, 7, -1, 1, 18, 12], "sigma": [15, 10, 16, 11, 9, 11, 10, 18]},
    "log_prob": ["normal_lpdf(mu, 0, 5)", "cauchy_lpdf(tau, 0, 5)",
                 "normal_lpdf(theta_tilde, 0, 1)", "normal_lpdf(y, mu + tau * theta_tilde, sigma)"],
    "derived": {"theta": "mu + tau * theta_tilde"},
}


def test_the_contract_example_matches_hand_written_torch():
    model = from_spec(EIGHT_SCHOOLS)
    assert isinstance(model, ModelTarget) and model.dim == 10
    assert model.columns == (["mu", "tau"] + [f"theta_tilde[{i}]" for i in range(8)]
                             + [f"theta[{i}]" for i in range(8)])
    z = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mu, log_tau, tt = z[:, 0], z[:, 1], z[:, 2:]
    tau = torch.exp(log_tau)
    y = torch.tensor(EIGHT_SCHOOLS["data"]["y"], dtype=torch.float64)
    sigma = torch.tensor(EIGHT_SCHOOLS["data"]["sigma"], dtype=torch.float64)
    normal = torch.distributions.Normal
    want = (normal(0.0, 5.0).log_prob(mu) + torch.distributions.Cauchy(0.0, 5.0).log_prob(tau)
            + normal(0.0, 1.0).log_prob(tt).sum(-1)
            + normal(mu[:, None] + tau[:, None] * tt, sigma).log_prob(y).sum(-1))
    torch.testing.assert_close(model.log_prob(z), want.double() + log_tau)
    values, _ = model.constrain(z)
    torch.testing.assert_close(model.derived(values), mu[:, None] + tau[:, None] * tt)


# --------------------------------------------------------------------------- numpy semantics
X = np.arange(60, dtype=float).reshape(3, 4, 5) / 7.0
G, H = [2, 0, 2, 1], [4, 0, 3, 3]
INDEXES = ["x[1]", "x[-1]", "x[:, 2]", "x[1:, ::-1, 2]", "x[:, :, 0]",
           "x[g]", "x[g, 1]", "x[:, g]", "x[:, g, h]", "x[g, :, h]", "x[0, :, h]", "x[g2]",
           "x[g2, 1:3]", "x[-1, -2:]", "x[g][:, 0]", "x[1, 2, 3]", "x[::2, 1::2, ::-2]",
           "x[K - 1]", "x[:, :K]"]


def _numpy_index(text: str, x: np.ndarray) -> np.ndarray:
    env = {"x": x, "g": np.array(G), "h": np.array(H), "g2": np.array([[0, 1], [2, 1]]), "K": 2}
    # a tiny, test-only interpreter of the index string over numpy: only names, ints and slices
    def value(node):
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = value(node.left), value(node.right)
            return a - b if isinstance(node.op, ast.Sub) else a + b
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else value(p)
                           for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.Subscript):
            return value(node.value)[value(node.slice)]
        raise AssertionError(ast.dump(node))

    return value(ast.parse(text, mode="eval").body)


@pytest.mark.parametrize("text", INDEXES)
def test_indexing_matches_numpy_on_data_and_per_sample(text):
    data = {"xd": X.tolist(), "g": G, "h": H, "g2": [[0, 1], [2, 1]], "K": 2,
            "w": [[[1.0]], [[2.0]], [[-3.0]]]}
    want = _numpy_index(text, X)
    folded = evaluate(text.replace("x[", "xd[", 1) + " + 0 * s", {"s": np.zeros(N)}, data)
    close(folded, np.broadcast_to(want, (N, *want.shape)))
    # per sample: a 3-axis value built from a matrix parameter (parameters have at most 2 axes)
    v = np.random.default_rng(0).normal(size=(N, 4, 5))
    xs = np.array(data["w"]) * v[:, None]
    got = evaluate(text.replace("x[", "(w * rep(v, 3))[", 1), {"v": v}, data)
    close(got, np.stack([_numpy_index(text, xs[i]) for i in range(N)]))


def test_broadcasting_follows_numpy():
    a, b = np.random.default_rng(0).normal(size=(N, 3, 1)), np.arange(4.0)
    close(evaluate("a * b - b", {"a": a}, {"b": b.tolist()}), a * b - b)
    close(evaluate("sum(a + b, 0)", {"a": a}, {"b": b.tolist()}), (a + b).sum(1))


def test_each_term_is_summed_and_terms_are_added():
    model = from_spec({"params": {"x": {"shape": [3]}}, "data": {"c": [1.0, 2.0]},
                       "log_prob": ["x", "c", "-x * x"]})
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(z), torch.tensor([6.0 + 3.0 - 14.0],
                                                               dtype=torch.float64))
    single = from_spec({"params": {"x": {}}, "log_prob": "normal_lpdf(x, 0, 1)"})
    assert single.spec["log_prob"] == "normal_lpdf(x, 0, 1)"


def test_data_only_values_fold_and_integer_data_stays_integer():
    model = from_spec({"params": {"a": {"shape": [3]}}, "data": {"g": [2, 2, 0, 1], "w": [4.0, 9]},
                       "log_prob": "sum(a[g]) * sqrt(w[g[-1]])"})
    z = torch.tensor([[1.0, 10.0, 100.0]], dtype=torch.float64)
    torch.testing.assert_close(model.log_prob(z), torch.tensor([211.0 * 3], dtype=torch.float64))
    assert model.spec["data"] == {"g": [2, 2, 0, 1], "w": [4.0, 9.0]}


def test_fit_target_accepts_a_model_and_keeps_its_spec():
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "maf", "dim": 10, "transforms": 1, "hidden": [8]})
    result = nfcore.fit_target(flow, EIGHT_SCHOOLS, steps=20, ess_samples=200)
    assert json.loads(json.dumps(result.summary["target_spec"])) == from_spec(EIGHT_SCHOOLS).spec
    z, log_q = flow.sample_and_log_prob(7)
    draws = from_spec(result.summary["target_spec"]).draws(z.detach(), log_q.detach())
    assert draws.samples.shape == (7, 18) and torch.isfinite(draws.log_weights).all()


# --------------------------------------------------------------------------- errors
BASE = {"params": {"a": {"shape": [3]}, "M": {"shape": [3, 2]}, "s": {"lower": 0}},
        "data": {"g": [0, 2, 1, 1], "X": [[1.0, 2.0, 3.0], [4, 5, 6]], "y": [1.0, 2.0], "K": 2,
                 "k": [0, 3, 1]}}


@pytest.mark.parametrize(("log_prob", "message", "position"), [
    # an unknown name
    ("normal_lpdf(y, mu, s)", "Unknown name 'mu'; known names: a, M, s, g, X, y, K, k", (1, 15)),
    ("sum(a)\n + foo(a)", "Unknown function 'foo'", (2, 3)),
    # shapes that do not broadcast
    ("sum(a + y)", "shapes [3] and [2]: lengths 3 and 2, which do not broadcast", (1, 4)),
    ("sum(M @ a)", "@: inner lengths 2 and 3 do not match (shapes [3, 2] and [3])", (1, 4)),
    ("sum(X @ a + a)", "lengths 2 and 3", (1, 4)),
    # an integer index out of range
    ("a[3]", "Index 3 is out of range for a last axis of length 3", (1, 0)),
    ("sum(a[k])", "Index 3 is out of range for a last axis of length 3", (1, 4)),
    ("sum(M[:, K])", "Index 2 is out of range for a last axis of length 2", (1, 4)),
    ("sum(M[k, 0])", "Index 3 is out of range for axis 0 of length 3", (1, 4)),
    # a real number used as an index
    ("a[0.5]", "Indices must be integer literals or integer data; got a real number", (1, 2)),
    ("sum(a[y])", "got a real number", (1, 6)),
    ("a[s]", "it cannot depend on the parameters", (1, 2)),
    ("sum(a[g > 0])", "Boolean masks cannot index", (1, 6)),
    ("sum(a[1.0:])", "A slice bound must be an integer literal or integer data", (1, 6)),
    # other shape rules
    ("sum(a[0, 1])", "Too many indices: 2 for a value of shape [3]", (1, 4)),
    ("s[0]", "Cannot index a scalar", (1, 0)),
    ("sum(a[3:])", "Slice selects nothing", (1, 4)),
    ("sum(a, 1)", "Axis 1 is out of range for a value of shape [3]", (1, 7)),
    ("cholesky(M)", "cholesky() needs a square matrix; got shape [3, 2]", (1, 9)),
    ("rep(s, 0)", "The count of rep() must be at least 1", (1, 7)),
    ("rep(s, K * 1.0)", "must be an integer literal or integer data", (1, 7)),
    ("linear_recurrence(0, a, s)", "the input needs a time axis", (1, 24)),
    ("linear_recurrence(a, 0, a)", "init of shape [3] must broadcast to one step", (1, 18)),
    ("gp_exp_quad_cov(y, a, s)", "alpha must be a scalar", (1, 19)),
    ("multi_normal_cholesky_lpdf(a, 0, M)", "L must have shape [3, 3]; got [3, 2]", (1, 33)),
    ("poisson_log_lpmf(a, 0)", "the outcome must be data", (1, 17)),
    ("poisson_log_lpmf(y * 0.5, 0)", "whole numbers", (1, 17)),
    ("bernoulli_logit_lpmf(k, a)", "must be 0 or 1", (1, 21)),
    ("binomial_logit_lpmf(k, g[:3], a)", "must not exceed the number of trials", (1, 20)),
    ("exp(a < 1)", "A comparison can only be the first argument of where()", (1, 4)),
    ("a < 1", "The term is a comparison", (1, 0)),
    ("where(a, 1, 2)", "first argument of where() must be a comparison", (1, 6)),
    ("sum(a, 0, 1)", "sum() takes 1 to 2 argument(s); got 3", (1, 0)),
    ("a.T", "attribute access is not allowed", (1, 0)),
    ("sum(a) + (a", "Syntax error", None),
    ("log(0 * K)", "does not depend on the parameters and is not finite", (1, 0)),
    ("sum(rep(rep(a, 1000), 1000))", "elements per sample; at most", (1, 4)),
])
def test_errors_name_the_problem_and_its_position(log_prob, message, position):
    spec = {**BASE, "log_prob": ["normal_lpdf(s, 0, 1)", log_prob]}
    with pytest.raises(ExpressionError) as info:
        from_spec(spec)
    err = info.value
    assert str(err).startswith("log_prob[1]: "), str(err)
    assert message in str(err), str(err)
    if position is not None:
        assert err.position == position, str(err)
        assert f"at line {position[0]}, column {position[1]}" in str(err)


def test_errors_in_derived_quantities_name_them():
    with pytest.raises(ExpressionError, match=r"^derived\.theta: Unknown name 'b'") as info:
        from_spec({**BASE, "log_prob": "sum(a)", "derived": {"ok": "a", "theta": "a +\n  b"}})
    assert info.value.position == (2, 2)
    with pytest.raises(ExpressionError, match="derived.c: The derived quantity is a comparison"):
        from_spec({**BASE, "log_prob": "sum(a)", "derived": {"c": "a > 0"}})


@pytest.mark.parametrize(("change", "message"), [
    ({"params": {"w": {"constraint": "simplex"}}}, "needs a vector shape"),
    ({"params": {}}, "params: expected an object of 1 to"),
    ({"params": {"exp": {}}}, "'exp' is reserved"),
    ({"params": {"lambda": {}}}, "not a valid name"),
    ({"params": {"_x": {}}}, "not a valid name"),
    ({"params": {"w": {}}, "data": {"w": 1}}, "'w' is already a parameter name"),
    ({"derived": {"a": "a"}}, "'a' is already a parameter name"),
    ({"data": {"d": [[1, 2], [3]]}}, "rectangular"),
    ({"data": {"d": [1, "2"]}}, "expected a number"),
    ({"data": {"d": [True, 1]}}, "expected a number"),
    ({"data": {"d": None}}, "expected a number"),
    ({"data": {"d": []}}, "must not be empty"),
    ({"data": {"d": [1.0, float("nan")]}}, "finite"),
    ({"data": {"d": 2**63}}, "too large"),
    ({"data": {"d": [[[[1]]]]}}, "at most 3 levels"),
    ({"data": {"d": [0.0] * (MODEL_LIMITS["data_size"] + 1)}}, "numbers in all"),
    ({"data": [1, 2]}, "data: expected an object"),
    ({"log_prob": []}, "log_prob: expected an expression or a list of 1 to"),
    ({"log_prob": ["sum(a)"] * (MODEL_LIMITS["terms"] + 1)}, "log_prob: expected"),
    ({"log_prob": [3]}, "log_prob[0]: expected a string"),
    ({"log_prob": "x" * (LIMITS["length"] + 1)}, "too long"),
    ({"derived": ["a"]}, "derived: expected an object"),
    ({"params": {f"p{i}": {} for i in range(MODEL_LIMITS["params"] + 1)}}, "params: expected"),
    ({"params": {"big": {"shape": [4096, 2]}}}, "unconstrained reals in all"),
    ({"context": {"x": {"shape": [0]}}}, "context.x.shape: expected a list"),
    ({"context": {"a": {}}}, "context: 'a' is already a parameter name"),
    # counts observed as a context: the message names the context and the way round it
    ({"context": {"y": {"shape": [3]}}, "log_prob": "poisson_log_lpmf(y, a)"},
     "cannot depend on the parameters or on a context"),
])
def test_bad_models_raise_target_errors_naming_the_field(change, message):
    spec = {"params": {"a": {"shape": [3]}}, "log_prob": "sum(a)", **change}
    with pytest.raises(TargetError) as info:
        from_spec(spec)
    assert message in str(info.value), str(info.value)


def test_from_spec_names_every_form_when_it_recognises_none():
    with pytest.raises(TargetError, match="a model {'params', 'data', 'context', 'log_prob', 'derived'}"):
        from_spec({"log_prob": "0"})
    with pytest.raises(TargetError, match="model: expected keys"):
        from_spec({"params": {"a": {}}})


# --------------------------------------------------------------------------- fuzzing
FUZZ_MODEL = {"params": {"a": {"shape": [3]}, "M": {"shape": [3, 2]}, "s": {"lower": 0},
                         "p": {"constraint": "simplex", "shape": [3]}},
              "data": {"g": [0, 2, 1, 1], "X": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
                       "y": [1.0, 2.0], "K": 2, "k": [0, 3, 1]}}
_KNOWN = {*FUZZ_MODEL["params"], *FUZZ_MODEL["data"]}

_leaves = st.sampled_from([
    "a", "M", "s", "p", "g", "X", "y", "K", "k", "1", "0", "2.5", "-1", "1e3", "3", "a[0]",
    "M[:, 1]", "X[g[0]]", "a[g]", "M[k, 0]", "y[1:]", "a[::-1]", "x", "z", "__import__", "open",
    "'s'", "None", "True", "...", "a.T", "[1]", "(1, 2)", "a[1.5]", "a[s]", "a[9]", "lambda: 0",
])
_ops = st.sampled_from(["+", "-", "*", "/", "**", "@", "%", "<", "==", "and", "|", "is"])
_functions = st.sampled_from([*FUNCTIONS, "eval", "exec", "getattr", "print", "type", "vars"])
_index = st.sampled_from(["0", "-1", "1:", ":2", "::-1", ":, 0", "g", "k", "g, 1", "K", "0, 0, 0",
                          "s", "1.5", ":, g", "a"])


def _grow(children):
    return st.one_of(
        st.tuples(children, _ops, children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(_functions, st.lists(children, min_size=0, max_size=4)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.tuples(children, _index).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(st.sampled_from(["-", "+", "not ", "~"]), children).map("".join),
        st.tuples(children, children, children).map(
            lambda t: f"where({t[0]} > {t[1]}, {t[1]}, {t[2]})"),
    )


_expressions = st.recursive(_leaves, _grow, max_leaves=10)


@contextlib.contextmanager
def _no_code_execution():
    """eval and exec fail loudly, and are recorded, while the model compiles and runs."""
    calls: list[str] = []
    saved = {name: getattr(builtins, name) for name in ("eval", "exec")}

    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return f

    for name in saved:
        setattr(builtins, name, forbidden(name))
    try:
        yield calls
    finally:
        for name, f in saved.items():
            setattr(builtins, name, f)


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms=st.lists(_expressions, min_size=1, max_size=2), derived=_expressions)
def test_fuzz_expressions_only_raise_typed_errors(terms, derived):
    model = None
    with _no_code_execution() as calls:
        try:
            model = from_spec({**FUZZ_MODEL, "log_prob": terms, "derived": {"d": derived}})
        except TargetError:
            pass
        if model is not None:
            z = torch.randn(4, model.dim, dtype=torch.float64)
            out = model.log_prob(z)
            values, _ = model.constrain(z)
            derived_values = model.derived(values)
    assert not calls, calls
    if model is None:
        return
    assert out.shape == (4,) and out.dtype == torch.float64
    assert derived_values.shape == (4, len(model.derived_columns))
    # It compiled, so every name it uses is known and every call is to the library.
    for text in [*terms, derived]:
        for node in ast.walk(ast.parse(text.strip(), mode="eval")):
            if isinstance(node, ast.Name):
                assert node.id in _KNOWN or node.id in FUNCTIONS, text
            assert not isinstance(node, ast.Attribute | ast.Lambda | ast.List), text


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
              st.text(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12)
_declarations = st.fixed_dictionaries({}, optional={
    "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), _json),
    "lower": st.one_of(st.integers(-3, 3), st.floats(), _json),
    "upper": st.one_of(st.integers(-3, 3), st.floats(), _json),
    "constraint": st.one_of(st.sampled_from(["ordered", "simplex", "other"]), _json),
})


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(st.sampled_from(["a", "b", "exp", "1x", "z"]), _declarations,
                              max_size=3),
       data=st.dictionaries(st.sampled_from(["d", "a", "n"]), _json, max_size=2),
       log_prob=st.one_of(st.sampled_from(["sum(a)", "normal_lpdf(b, 0, 1)", "sum(d) * sum(a)"]),
                          _json))
def test_fuzz_model_json_only_raises_typed_errors(params, data, log_prob):
    try:
        model = from_spec({"params": params, "data": data, "log_prob": log_prob})
    except TargetError:
        return
    out = model.log_prob(torch.zeros(2, model.dim, dtype=torch.float64))
    assert out.shape == (2,)
    assert from_spec(json.loads(json.dumps(model.spec))).spec == model.spec

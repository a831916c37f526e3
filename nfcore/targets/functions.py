"""The function library of the expression language: each entry checks its arguments' shapes at
compile time and maps to a fixed number of torch ops.

Element-wise (numpy broadcasting over all arguments):
    exp, log, log1p, expm1, sqrt, square, abs, sin, cos, tanh, sigmoid (alias inv_logit), logit,
    softplus (alias log1p_exp), lgamma, minimum(a, b), maximum(a, b), where(a < b, x, y),
    log_mix(theta, lp1, lp2) = log(theta exp(lp1) + (1 - theta) exp(lp2)).

Reductions and scans (``axis`` is an optional integer; 0-based, negative counts from the end):
    sum, mean, logsumexp (alias log_sum_exp), norm (Euclidean): over every axis, or over ``axis``;
    cumsum(x, axis=0);
    linear_recurrence(init, coef, input): ``s[0] = init``, ``s[t] = coef * s[t-1] + input[t]``
    along axis 0 of ``input`` (``input[0]`` is not used). ``coef`` broadcasts to ``input``'s shape
    (one per step, or one for all) and ``init`` to ``input[0]``'s. Computed by a log-depth scan.

Structured:
    cholesky(K): the lower Cholesky factor (NaN where ``K`` is not positive definite);
    gp_exp_quad_cov(x, alpha, rho): ``alpha^2 exp(-|x_i - x_j|^2 / (2 rho^2))`` for the points
    ``x`` (a vector, or a matrix with one point per row);
    rep(value, n): ``n`` copies of ``value`` along a new axis 0;
    concat(a, b, ...): joined along axis 0, like Stan's append_row: a value of lower rank than
    the others counts as one entry (a scalar beside vectors, a vector as a row of a matrix);
    diag_matrix(v): the diagonal matrix with ``v`` on its diagonal.

Log densities, element-wise with the broadcast shape of their arguments, as in scipy and numpyro
(a model's term sums them). Arguments follow Stan: the outcome first, then the parameters.
    normal_lpdf(y, mu, sigma), student_t_lpdf(y, nu, mu, sigma), cauchy_lpdf(y, mu, sigma),
    lognormal_lpdf(y, mu, sigma), exponential_lpdf(y, rate), gamma_lpdf(y, shape, rate),
    inv_gamma_lpdf(y, shape, scale), beta_lpdf(y, a, b), uniform_lpdf(y, lower, upper);
    bernoulli_logit_lpmf(y, alpha), binomial_logit_lpmf(y, n, alpha), poisson_log_lpmf(y, eta),
    neg_binomial_2_log_lpmf(y, eta, phi) (mean ``exp(eta)``, variance ``mu + mu^2 / phi``);
    multi_normal_cholesky_lpdf(y, mu, L): one value per vector along the last axis of ``y - mu``.

A continuous density is ``-inf`` outside its support. The outcome of an ``_lpmf`` must be data of
whole numbers in its support (checked at compile time).

References: Stan Functions Reference (2024), for the names, argument orders and parametrisations.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .expression import Value, fmt_shape

if TYPE_CHECKING:
    from .expression import Compiler

__all__ = ["FUNCTIONS", "Function", "matmul"]

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_PI = math.log(math.pi)
_NEG_INF = float("-inf")

Build = Callable[["Compiler", list[ast.expr], ast.Call], Value]


@dataclass(frozen=True)
class Function:
    """A library entry: its ``(min, max)`` argument count and its compile-time ``build``."""

    arguments: tuple[int, int]
    build: Build


# --------------------------------------------------------------------------- element-wise
def _elementwise(fn: Callable[..., Tensor], n: int = 1) -> Function:
    def build(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
        return c.apply(fn, [c.real(a) for a in args], node)

    return Function((n, n), build)


def _where(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    cond = c.visit(args[0])
    if cond.kind != "bool":
        raise c.error("The first argument of where() must be a comparison", args[0])
    a, b = c.visit(args[1]), c.visit(args[2])
    for arg, v in zip(args[1:], (a, b), strict=True):
        if v.kind == "bool":
            raise c.error("A comparison can only be the first argument of where()", arg)
    if a.kind == b.kind == "int" and not cond.batched:
        return c.apply(torch.where, [cond, a, b], node, kind="int")
    return c.apply(torch.where, [cond, c.real(args[1]), c.real(args[2])], node)


def _log_mix(theta: Tensor, lp1: Tensor, lp2: Tensor) -> Tensor:
    return torch.logaddexp(torch.log(theta) + lp1, torch.log1p(-theta) + lp2)


# --------------------------------------------------------------------------- reductions, scans
def _axis(c: Compiler, x: Value, arg: ast.expr, name: str) -> int:
    rank = len(x.shape)
    if rank == 0:
        raise c.error(f"{name}() of a scalar takes no axis", arg)
    axis = c.const_int(arg, "The axis")
    if not -rank <= axis < rank:
        raise c.error(f"Axis {axis} is out of range for a value of shape {fmt_shape(x.shape)}",
                      arg)
    return axis % rank


def _reduction(name: str, fn: Callable[[Tensor, tuple[int, ...]], Tensor],
               scalar: Callable[[Tensor], Tensor] = lambda t: t) -> Function:
    def build(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
        x = c.real(args[0])
        rank = len(x.shape)
        if len(args) == 2:
            axis = _axis(c, x, args[1], name)
            dims, shape = (axis - rank,), x.shape[:axis] + x.shape[axis + 1:]
        elif rank == 0:
            return c.apply(scalar, [x], node, shape=(), ranks=[None])
        else:
            dims, shape = tuple(range(-rank, 0)), ()
        return c.apply(lambda t: fn(t, dims), [x], node, shape=shape, ranks=[None])

    return Function((1, 2), build)


def _cumsum(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    x = c.real(args[0])
    if not x.shape:
        raise c.error("cumsum() needs a vector or an array; got a scalar", args[0])
    dim = (_axis(c, x, args[1], "cumsum") if len(args) == 2 else 0) - len(x.shape)
    return c.apply(lambda t: torch.cumsum(t, dim), [x], node, shape=x.shape, ranks=[None])


def _scan(a: Tensor, b: Tensor) -> Tensor:
    """``s[t] = a[t] s[t-1] + b[t]`` along the last axis, with ``a[0] = 0``: a Hillis-Steele scan
    that composes the affine maps ``s -> a s + b`` pairwise, ``log2(T)`` rounds of element-wise
    ops (padding with the identity map ``a = 1, b = 0`` before the start).

    An exploding recursion (``|coef| > 1`` over many steps) saturates at the dtype's largest
    finite value instead of overflowing: an infinite product meeting the zero ``a[0]`` would
    otherwise give NaN where the sequential loop gives a huge number."""
    n = a.shape[-1]
    big = torch.finfo(a.dtype).max
    step = 1
    while step < n:
        b = torch.addcmul(b, a, F.pad(b, (step, 0))[..., :n]).clamp(-big, big)
        a = (a * F.pad(a, (step, 0), value=1.0)[..., :n]).clamp(-big, big)
        step *= 2
    return b


def _linear_recurrence(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    init, coef, inp = (c.real(a) for a in args)
    if not inp.shape:
        raise c.error("linear_recurrence(): the input needs a time axis (axis 0); got a scalar",
                      args[2])
    if c.broadcast([inp.shape, coef.shape], node) != inp.shape:
        raise c.error(f"linear_recurrence(): coef of shape {fmt_shape(coef.shape)} must broadcast "
                      f"to the input's shape {fmt_shape(inp.shape)}", args[1])
    if c.broadcast([inp.shape[1:], init.shape], node) != inp.shape[1:]:
        raise c.error(f"linear_recurrence(): init of shape {fmt_shape(init.shape)} must broadcast "
                      f"to one step of the input, {fmt_shape(inp.shape[1:])}", args[0])
    rank = len(inp.shape)

    def fn(s0: Tensor, a: Tensor, b: Tensor) -> Tensor:
        s0, a, b = torch.broadcast_tensors(s0, a, b)
        dim = a.ndim - rank  # the time axis, moved last for the scan
        s0, a, b = (t.movedim(dim, -1) for t in (s0, a, b))
        a = torch.cat([torch.zeros_like(a[..., :1]), a[..., 1:]], -1)
        b = torch.cat([s0[..., :1], b[..., 1:]], -1)
        return _scan(a, b).movedim(-1, dim)

    # ``init`` is lifted to the input's rank, so that it has a unit time axis.
    return c.apply(fn, [init, coef, inp], node, shape=inp.shape, ranks=[rank, rank, rank])


# --------------------------------------------------------------------------- structured
def matmul(c: Compiler, a: Value, b: Value, node: ast.AST) -> Value:
    """``a @ b`` per sample, for vectors and matrices."""
    ra, rb = len(a.shape), len(b.shape)
    if ra not in (1, 2) or rb not in (1, 2):
        raise c.error(f"@ needs vectors or matrices; got shapes {fmt_shape(a.shape)} and "
                      f"{fmt_shape(b.shape)}", node)
    if a.shape[-1] != b.shape[0]:
        raise c.error(f"@: inner lengths {a.shape[-1]} and {b.shape[0]} do not match (shapes "
                      f"{fmt_shape(a.shape)} and {fmt_shape(b.shape)})", node)
    shape = a.shape[:-1] + b.shape[1:]
    if ra == 2 and rb == 1 and not a.batched and b.batched:
        # data matrix times a vector per sample: one GEMM, (S, k) @ (k, n)
        return c.apply(lambda m, v: v @ m.T, [a, b], node, shape=shape, ranks=[None, None])

    def fn(x: Tensor, y: Tensor) -> Tensor:
        out = torch.matmul(x.unsqueeze(-2) if ra == 1 else x, y.unsqueeze(-1) if rb == 1 else y)
        if rb == 1:
            out = out.squeeze(-1)
        if ra == 1:
            out = out.squeeze(-1 if rb == 1 else -2)
        return out

    return c.apply(fn, [a, b], node, shape=shape, ranks=[None, None])


def _cholesky_factor(k: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(k)
    return torch.where((info != 0)[..., None, None], float("nan"), factor)


def _cholesky(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    k = c.real(args[0])
    if len(k.shape) != 2 or k.shape[0] != k.shape[1]:
        raise c.error(f"cholesky() needs a square matrix; got shape {fmt_shape(k.shape)}", args[0])
    out = c.apply(_cholesky_factor, [k], node, shape=k.shape, ranks=[None])
    if not out.batched and bool(torch.isnan(out.const).any()):
        raise c.error("cholesky(): the matrix is not positive definite", node)
    return out


def _gp_exp_quad_cov(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    x, alpha, rho = (c.real(a) for a in args)
    if len(x.shape) not in (1, 2):
        raise c.error("gp_exp_quad_cov(): x must be a vector of points or a matrix with one point "
                      f"per row; got shape {fmt_shape(x.shape)}", args[0])
    for arg, v, name in ((args[1], alpha, "alpha"), (args[2], rho, "rho")):
        if v.shape:
            raise c.error(f"gp_exp_quad_cov(): {name} must be a scalar; got shape "
                          f"{fmt_shape(v.shape)}", arg)
    vector = len(x.shape) == 1

    def fn(t: Tensor, a: Tensor, r: Tensor) -> Tensor:
        if vector:
            d2 = (t.unsqueeze(-1) - t.unsqueeze(-2)) ** 2
        else:
            d2 = ((t.unsqueeze(-2) - t.unsqueeze(-3)) ** 2).sum(-1)
        return a * a * torch.exp(-0.5 * d2 / (r * r))

    n = x.shape[0]
    return c.apply(fn, [x, alpha, rho], node, shape=(n, n), ranks=[None, 2, 2])


def _rep(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    v = c.visit(args[0])
    if v.kind == "bool":
        raise c.error("A comparison can only be the first argument of where()", args[0])
    n = c.const_int(args[1], "The count of rep()")
    if n < 1:
        raise c.error(f"The count of rep() must be at least 1; got {n}", args[1])
    inner = v.shape

    def fn(t: Tensor) -> Tensor:
        lead = t.shape[:t.ndim - len(inner)]
        return t.unsqueeze(t.ndim - len(inner)).expand(*lead, n, *inner)

    return c.apply(fn, [v], node, shape=(n, *inner), kind=v.kind, ranks=[None])


def _concat(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    vals = [c.visit(a) for a in args]
    for arg, v in zip(args, vals, strict=True):
        if v.kind == "bool":
            raise c.error("A comparison can only be the first argument of where()", arg)
    integer = all(v.kind == "int" for v in vals)
    if not integer:
        vals = [c.real(a) for a in args]
    top = max(1, *(len(v.shape) for v in vals))
    shapes = [v.shape if len(v.shape) == top else (1, *v.shape) for v in vals]
    trailing = c.broadcast([s[1:] for s in shapes], node)
    length = sum(s[0] for s in shapes)
    shape = (length, *trailing)
    # each argument is reshaped to (len, 1.., *rest) so its trailing axes broadcast
    padded = [(s[0], *(1,) * (len(trailing) - len(s) + 1), *s[1:]) for s in shapes]
    flags = [v.batched for v in vals]
    ranks = [len(v.shape) for v in vals]

    def fn(*ts: Tensor) -> Tensor:
        lead = next((t.shape[:1] for t, f in zip(ts, flags, strict=True) if f), ())
        parts = []
        for t, r, p in zip(ts, ranks, padded, strict=True):
            t = t.reshape(*t.shape[:t.ndim - r], *p)
            parts.append(t.expand(*lead, p[0], *trailing))
        return torch.cat(parts, -len(shape))

    return c.apply(fn, vals, node, shape=shape, kind="int" if integer else "real",
                   ranks=[None] * len(vals))


def _diag_matrix(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    v = c.real(args[0])
    if len(v.shape) != 1:
        raise c.error(f"diag_matrix() needs a vector; got shape {fmt_shape(v.shape)}", args[0])
    n = v.shape[0]
    return c.apply(torch.diag_embed, [v], node, shape=(n, n), ranks=[None])


# --------------------------------------------------------------------------- log densities
def _normal(y: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    z = (y - mu) / sigma
    return -0.5 * z * z - torch.log(sigma) - 0.5 * _LOG_2PI


def _student_t(y: Tensor, nu: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    z = (y - mu) / sigma
    return (torch.lgamma(0.5 * (nu + 1)) - torch.lgamma(0.5 * nu) - 0.5 * torch.log(nu * math.pi)
            - torch.log(sigma) - 0.5 * (nu + 1) * torch.log1p(z * z / nu))


def _cauchy(y: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    z = (y - mu) / sigma
    return -_LOG_PI - torch.log(sigma) - torch.log1p(z * z)


def _lognormal(y: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    inside = y > 0
    log_y = torch.log(torch.where(inside, y, 1.0))
    z = (log_y - mu) / sigma
    return torch.where(inside, -0.5 * z * z - torch.log(sigma) - 0.5 * _LOG_2PI - log_y, _NEG_INF)


def _exponential(y: Tensor, rate: Tensor) -> Tensor:
    return torch.where(y >= 0, torch.log(rate) - rate * y, _NEG_INF)


def _gamma(y: Tensor, shape: Tensor, rate: Tensor) -> Tensor:
    inside = y >= 0
    ys = torch.where(inside, y, 1.0)
    out = shape * torch.log(rate) - torch.lgamma(shape) + torch.xlogy(shape - 1, ys) - rate * ys
    return torch.where(inside, out, _NEG_INF)


def _inv_gamma(y: Tensor, shape: Tensor, scale: Tensor) -> Tensor:
    inside = y > 0
    ys = torch.where(inside, y, 1.0)
    out = shape * torch.log(scale) - torch.lgamma(shape) - (shape + 1) * torch.log(ys) - scale / ys
    return torch.where(inside, out, _NEG_INF)


def _beta(y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    inside = (y >= 0) & (y <= 1)
    ys = torch.where(inside, y, 0.5)
    out = (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b) + torch.xlogy(a - 1, ys)
           + torch.special.xlog1py(b - 1, -ys))
    return torch.where(inside, out, _NEG_INF)


def _uniform(y: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    return torch.where((y >= lower) & (y <= upper), -torch.log(upper - lower), _NEG_INF)


def _bernoulli_logit(y: Tensor, alpha: Tensor) -> Tensor:
    return y * alpha - F.softplus(alpha)


def _binomial_logit(y: Tensor, n: Tensor, alpha: Tensor) -> Tensor:
    log_choose = torch.lgamma(n + 1) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)
    return log_choose + y * alpha - n * F.softplus(alpha)


def _poisson_log(y: Tensor, eta: Tensor) -> Tensor:
    return y * eta - torch.exp(eta) - torch.lgamma(y + 1)


def _neg_binomial_2_log(y: Tensor, eta: Tensor, phi: Tensor) -> Tensor:
    log_phi = torch.log(phi)
    return (torch.lgamma(y + phi) - torch.lgamma(y + 1) - torch.lgamma(phi) + y * eta
            + phi * log_phi - (y + phi) * torch.logaddexp(eta, log_phi))


def _density(fn: Callable[..., Tensor], n: int) -> Function:
    return _elementwise(fn, n)


def _counts(c: Compiler, arg: ast.expr, name: str, what: str, *, at_most_one: bool = False) -> Value:
    """The outcome (or trial count) of an ``_lpmf``: data of whole numbers, made real."""
    v = c.visit(arg)
    if v.batched:
        raise c.error(f"{name}(): {what} must be data, whose whole numbers are checked when the "
                      "model is built; it cannot depend on the parameters or on a context (for "
                      "counts observed as a context, write the log pmf out, e.g. Poisson's "
                      "y * eta - exp(eta) - lgamma(y + 1))", arg)
    if v.kind == "bool":
        raise c.error("A comparison can only be the first argument of where()", arg)
    t = v.const.to(torch.float64)
    if not bool((t == torch.round(t)).all()) or not bool((t >= 0).all()):
        raise c.error(f"{name}(): {what} must be whole numbers >= 0", arg)
    if at_most_one and not bool((t <= 1).all()):
        raise c.error(f"{name}(): {what} must be 0 or 1", arg)
    return Value(v.shape, "real", const=t)


def _pmf(name: str, fn: Callable[..., Tensor], n: int, *, binary: bool = False,
         trials: bool = False) -> Function:
    def build(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
        y = _counts(c, args[0], name, "the outcome", at_most_one=binary)
        rest = [c.real(a) for a in args[1:]]
        if trials:
            rest[0] = _counts(c, args[1], name, "the number of trials")
            c.broadcast([y.shape, rest[0].shape], node)
            if not bool((y.const <= rest[0].const).all()):
                raise c.error(f"{name}(): the outcome must not exceed the number of trials",
                              args[0])
        return c.apply(fn, [y, *rest], node)

    return Function((n, n), build)


def _multi_normal_cholesky(c: Compiler, args: list[ast.expr], node: ast.Call) -> Value:
    y, mu, factor = (c.real(a) for a in args)
    vectors = c.broadcast([y.shape, mu.shape], node)
    if not vectors:
        raise c.error("multi_normal_cholesky_lpdf(): y and mu must be vectors (or arrays of "
                      "vectors along the last axis); got scalars", node)
    k = vectors[-1]
    if factor.shape != (k, k):
        raise c.error(f"multi_normal_cholesky_lpdf(): L must have shape {fmt_shape((k, k))}; got "
                      f"{fmt_shape(factor.shape)}", args[2])
    batch = vectors[:-1]
    m = math.prod(batch)
    rank = len(vectors)

    def fn(yt: Tensor, mt: Tensor, lt: Tensor) -> Tensor:
        diff = yt - mt
        lead = diff.shape[:diff.ndim - rank]
        diff = diff.expand(*lead, *vectors).reshape(*lead, m, k).transpose(-1, -2)
        white = torch.linalg.solve_triangular(lt, diff, upper=False)
        log_det = torch.log(torch.diagonal(lt, dim1=-2, dim2=-1)).sum(-1)
        out = -0.5 * (white * white).sum(-2) - log_det.unsqueeze(-1) - 0.5 * k * _LOG_2PI
        return out.reshape(*out.shape[:-1], *batch)

    return c.apply(fn, [y, mu, factor], node, shape=batch, ranks=[rank, rank, None])


# --------------------------------------------------------------------------- the table
_sigmoid = _elementwise(torch.sigmoid)
_softplus = _elementwise(F.softplus)
_logsumexp = _reduction("logsumexp", lambda t, d: torch.logsumexp(t, d))

#: Function name -> library entry. Aliases share an entry.
FUNCTIONS: dict[str, Function] = {
    "exp": _elementwise(torch.exp), "log": _elementwise(torch.log),
    "log1p": _elementwise(torch.log1p), "expm1": _elementwise(torch.expm1),
    "sqrt": _elementwise(torch.sqrt), "square": _elementwise(torch.square),
    "abs": _elementwise(torch.abs), "sin": _elementwise(torch.sin), "cos": _elementwise(torch.cos),
    "tanh": _elementwise(torch.tanh), "sigmoid": _sigmoid, "inv_logit": _sigmoid,
    "logit": _elementwise(torch.logit), "softplus": _softplus, "log1p_exp": _softplus,
    "lgamma": _elementwise(torch.lgamma),
    "minimum": _elementwise(torch.minimum, 2), "maximum": _elementwise(torch.maximum, 2),
    "where": Function((3, 3), _where), "log_mix": _elementwise(_log_mix, 3),
    "sum": _reduction("sum", lambda t, d: t.sum(d)),
    "mean": _reduction("mean", lambda t, d: t.mean(d)),
    "logsumexp": _logsumexp, "log_sum_exp": _logsumexp,
    "norm": _reduction("norm", lambda t, d: torch.linalg.vector_norm(t, dim=d), torch.abs),
    "cumsum": Function((1, 2), _cumsum),
    "linear_recurrence": Function((3, 3), _linear_recurrence),
    "cholesky": Function((1, 1), _cholesky),
    "gp_exp_quad_cov": Function((3, 3), _gp_exp_quad_cov),
    "rep": Function((2, 2), _rep),
    "concat": Function((1, 16), _concat),
    "diag_matrix": Function((1, 1), _diag_matrix),
    "normal_lpdf": _density(_normal, 3),
    "student_t_lpdf": _density(_student_t, 4),
    "cauchy_lpdf": _density(_cauchy, 3),
    "lognormal_lpdf": _density(_lognormal, 3),
    "exponential_lpdf": _density(_exponential, 2),
    "gamma_lpdf": _density(_gamma, 3),
    "inv_gamma_lpdf": _density(_inv_gamma, 3),
    "beta_lpdf": _density(_beta, 3),
    "uniform_lpdf": _density(_uniform, 3),
    "bernoulli_logit_lpmf": _pmf("bernoulli_logit_lpmf", _bernoulli_logit, 2, binary=True),
    "binomial_logit_lpmf": _pmf("binomial_logit_lpmf", _binomial_logit, 3, trials=True),
    "poisson_log_lpmf": _pmf("poisson_log_lpmf", _poisson_log, 2),
    "neg_binomial_2_log_lpmf": _pmf("neg_binomial_2_log_lpmf", _neg_binomial_2_log, 3),
    "multi_normal_cholesky_lpdf": Function((3, 3), _multi_normal_cholesky),
}

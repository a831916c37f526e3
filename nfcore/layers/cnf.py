"""Continuous normalizing flows: ``dx/dt = v(t, x, c)``, solved by torchdiffeq's adaptive solvers.

Time runs from the base (``t = 0``) to the data (``t = 1``), as in flow matching. The log-density
follows ``d log p / dt = -div v``, so scoring integrates ``(x, div v)`` from 1 to 0 and sampling from
0 to 1, each to the spec's ``rtol`` and ``atol`` (torchdiffeq's error control over the whole state,
the log-determinant included).

The divergence is exact when scoring. ``v`` is an MLP of ``[x, time features, context]``, so its
Jacobian in ``x`` is ``W_L D_{L-1} ... D_1 W_1x`` with ``D_l`` the activation derivatives. With one
or two hidden layers its trace has a closed form that costs one matrix product a row, ``sum_jk
D2_j M_jk D1_k`` with ``M = W_2 * (W_1x W_3)^T`` computed once per solve; deeper fields carry the
Jacobian forward in one pass (``dim`` times the cost of ``v``). Training by maximum likelihood
(FFJORD) above ``exact_dim`` uses Hutchinson's estimator instead, ``eps^T (dv/dx) eps`` with one
probe per row for the whole solve, unless the closed form applies (it is cheaper than the
estimate). Flow matching (``nfcore.train.FlowMatching``) trains ``v`` without any solve.

Gradients go through the solver's steps (discretise-then-optimise), which is what reverse KL and
maximum likelihood need. The adaptive step size is chosen for the whole batch, so a row's answer
can differ, within the tolerance, with the rows it is solved with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConvergenceError
from ..limits import check_deadline
from .base import Dense, Layer

__all__ = ["CNF", "VectorField", "ODE_METHODS"]

#: Adaptive methods of torchdiffeq that the spec accepts.
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
_MAX_STEPS = 10_000


def _activation(name: str):
    """``a -> (act(a), act'(a))`` for the activations the spec accepts."""
    if name == "tanh":
        def f(a):
            y = torch.tanh(a)
            return y, 1.0 - y * y
    elif name == "silu":
        def f(a):
            s = torch.sigmoid(a)
            return a * s, s * (1.0 + a * (1.0 - s))
    elif name == "elu":
        def f(a):
            y = torch.nn.functional.elu(a)
            return y, torch.where(a > 0, torch.ones_like(a), y + 1.0)
    elif name == "gelu":
        def f(a):
            cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
            return a * cdf, cdf + a * torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    elif name == "relu":
        def f(a):
            return torch.relu(a), (a > 0).to(a.dtype)
    else:
        raise ValueError(f"Expected an activation in tanh, silu, elu, gelu, relu; got {name!r}")
    return f


def _activation_into(name: str):
    """``(a, d, tmp) -> None``: the activation written over ``a`` and, into ``d``, the part of its
    derivative that varies, with no allocation (``None`` for activations without such a form).
    Returned with ``(c, s)``: the derivative is ``c + s * d``, so a constant part costs no pass
    over the buffer (it goes into a bias of the matrix product that uses it). For solves without
    autograd, where each elementwise pass over a ``(rows, width)`` buffer costs about as much as a
    ``width x width`` matrix product at served batch sizes."""
    if name == "elu":
        def g(a, d, tmp):
            torch.nn.functional.elu(a, inplace=True)
            torch.clamp(a, max=0.0, out=d)  # elu' - 1 = min(elu(a), 0)
        return g, 1.0, 1.0
    if name == "silu":
        def g(a, d, tmp):
            torch.sigmoid(a, out=d)
            a.mul_(d)  # y = a s
            torch.mul(a, d, out=tmp)
            d.add_(a).sub_(tmp)  # s (1 + a (1 - s)) = s + y - y s
        return g, 0.0, 1.0
    if name == "tanh":
        def g(a, d, tmp):
            a.tanh_()
            torch.mul(a, a, out=d)  # tanh' = 1 - y^2
        return g, 1.0, -1.0
    return None


def _time_features(t: float, freqs: int) -> list[float]:
    """``[t, cos(pi k t), sin(pi k t)]`` for ``k = 1..freqs``, in double precision."""
    kt = [math.pi * k * t for k in range(1, freqs + 1)]
    return [t, *map(math.cos, kt), *map(math.sin, kt)]


def mixed_rms_norm(dim: int):
    """The solver's error norm over the flat state ``[x, l]`` of shape ``(N, dim + 1)``: the larger
    of the RMS of the ``x`` block and the RMS of the log-determinant column (torchdiffeq's mixed
    norm over the tuple ``(x, l)``), so the log-density is held to the tolerance on its own, not
    averaged with ``dim`` state features."""
    def norm(r: Tensor) -> Tensor:
        n = max(r.shape[0], 1)
        sq = r.square().sum(0)
        return torch.maximum(sq[:dim].sum() / (n * dim), sq[dim] / n).sqrt()
    return norm


class VectorField(nn.Module):
    """The time-conditioned MLP ``v(t, x, c)`` with its exact divergence.

    Arguments:
        dim: number of features; hidden, activation: the MLP; context_dim: context size;
        freqs: time features ``[t, cos(pi k t), sin(pi k t)]`` for ``k = 1..freqs``.
    """

    def __init__(self, dim: int, hidden: list[int], activation: str, context_dim: int = 0,
                 freqs: int = 3):
        super().__init__()
        self.dim, self.freqs, self.context_dim = dim, freqs, context_dim
        widths = [dim + 1 + 2 * freqs + context_dim, *hidden, dim]
        self.linears = nn.ModuleList(Dense(a, b) for a, b in zip(widths[:-1], widths[1:],
                                                                 strict=True))
        # v = 0 at first: the layer starts as the identity, so whatever the layers in front of
        # it fitted (a standardize, a loc_scale set from a Pathfinder start) is where training
        # starts. The last layer's gradient is not zero, so training moves off it at once.
        nn.init.zeros_(self.linears[-1].weight)
        nn.init.zeros_(self.linears[-1].bias)
        self.activation = activation
        self._act = _activation(activation)

    def embed(self, t: Tensor) -> Tensor:
        """Time features, shape ``t.shape + (1 + 2 freqs,)``."""
        k = torch.arange(1, self.freqs + 1, dtype=t.dtype, device=t.device) * math.pi
        kt = t[..., None] * k
        return torch.cat([t[..., None], torch.cos(kt), torch.sin(kt)], dim=-1)

    def velocity(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``v(t, x, c)`` for per-row times ``t`` of shape ``(N,)`` (flow matching)."""
        parts = [x, self.embed(t.to(x.dtype).expand(x.shape[0]))]
        if context is not None:
            parts.append(context)
        h = torch.cat(parts, dim=-1)
        for lin in self.linears[:-1]:
            h = self._act(lin(h))[0]
        return self.linears[-1](h)

    def dynamics(self, context: Tensor | None, probe: Tensor | None):
        """``f(t, x) -> (v, div v)`` for an ODE solve: the parts that do not change along the
        trajectory (context term, trace matrices) are computed once here. With ``probe``, the
        divergence is Hutchinson's estimate ``probe^T (dv/dx) probe``."""
        d = self.dim
        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias for lin in self.linears]
        w1 = weights[0]
        w1x, w1t = w1[:, :d], w1[:, d : d + 1 + 2 * self.freqs]
        first = biases[0] if context is None else biases[0] + context @ w1[:, d + 1 + 2 * self.freqs:].T
        depth = len(weights) - 1
        if probe is None and depth == 1:
            trace_vec = (w1x * weights[1].T).sum(1)
        elif probe is None and depth == 2:
            trace_mat = (weights[1] * (w1x @ weights[2]).T).T  # (h1, h2)
        act = self._act

        def f(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            shift = first + self.embed(t.to(x.dtype)) @ w1t.T
            h, d1 = act((x @ w1x.T).add_(shift))
            derivatives = [d1]
            for w, b in zip(weights[1:-1], biases[1:-1], strict=True):
                h, dl = act((h @ w.T).add_(b))
                derivatives.append(dl)
            v = (h @ weights[-1].T).add_(biases[-1])
            if probe is not None:
                u = probe
                for w, dl in zip(weights[:-1], derivatives, strict=True):
                    u = (u @ (w1x if w is w1 else w).T) * dl
                div = (probe * (u @ weights[-1].T)).sum(-1)
            elif depth == 1:
                div = d1 @ trace_vec
            elif depth == 2:
                div = torch.linalg.vecdot(d1 @ trace_mat, derivatives[1])
            else:
                j = derivatives[0][:, :, None] * w1x
                for w, dl in zip(weights[1:-1], derivatives[1:], strict=True):
                    j = dl[:, :, None] * (w @ j)
                div = torch.einsum("ik,nki->n", weights[-1], j)
            return v, div

        return f

    def ode(self, context: Tensor | None, probe: Tensor | None, sign: float = 1.0):
        """The solver's right-hand side ``g(s, y)`` over the flat state ``y = [x, l]`` of shape
        ``(N, dim + 1)``, in the time ``s = sign * t`` (so that a solve backward in ``t`` runs
        forward in ``s``): ``g = sign * [v(t, x), div v(t, x)]``.

        Without autograd, with the exact divergence of a one- or two-hidden-layer field and an
        activation of ``_activation_into``, it takes the lean path: hidden layers in buffers
        reused across evaluations, the time features in double precision on the host, and the
        output layer, the trace's last reduction and the sign in one matrix product. Otherwise
        it is ``dynamics`` (autograd-safe) with its two outputs joined."""
        depth = len(self.linears) - 1
        lean = _activation_into(self.activation)
        if probe is None and lean is not None and depth in (1, 2) and not torch.is_grad_enabled():
            return self._lean_ode(context, sign, *lean)
        f = self.dynamics(context, probe)

        def g(s: Tensor, y: Tensor) -> Tensor:
            v, div = f(s * sign, y[:, : self.dim])
            out = torch.cat([v, div[:, None]], dim=1)
            return out if sign == 1.0 else -out

        return g

    def _lean_ode(self, context: Tensor | None, sign: float, act, c: float, s: float):
        d, freqs = self.dim, self.freqs
        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias for lin in self.linears]
        w1 = weights[0]
        w1x, w1t = w1[:, :d], w1[:, d : d + 1 + 2 * freqs]
        wx_t = w1x.T
        rows = None if context is None else (biases[0] + context @ w1[:, d + 1 + 2 * freqs :].T)
        h1 = w1.shape[0]
        dtype, device = w1.dtype, w1.device
        if len(weights) == 2:
            # v = h W2^T + b2; div = D . tv with D = c + s d: one product of [h | d] with
            # [[W2^T, 0], [0, s tv]], plus the bias [b2, c sum(tv)].
            tv = (w1x * weights[1].T).sum(1)
            last_w = torch.zeros(2 * h1, d + 1, dtype=dtype, device=device)
            last_w[:h1, :d] = weights[1].T
            last_w[h1:, d] = s * tv
            last_b = torch.cat([biases[1], (c * tv.sum())[None]])
            h2 = 0
        else:
            # div = D1^T M D2 with M = W2^T * (W1x W3) (h1 x h2). P = D1 M = s d1 M + c colsum(M);
            # then P * D2 = c P + s P * d2 (in place, up to the factor c), and [a2 | P * D2]
            # times [[W3^T, 0], [0, c]] gives [v, div] in one product.
            w2, w3 = weights[1], weights[2]
            h2 = w2.shape[0]
            trace_mat = (w2 * (w1x @ w3).T).T  # (h1, h2)
            p_bias = c * trace_mat.sum(0)
            w2_t = w2.T
            last_w = torch.zeros(2 * h2, d + 1, dtype=dtype, device=device)
            last_w[:h2, :d] = w3.T
            last_w[h2:, d] = c if c else s  # P * D2 = c (P + (s / c) P * d2), or s P * d2
            last_b = torch.cat([biases[2], biases[2].new_zeros(1)])
        if sign != 1.0:
            last_w, last_b = sign * last_w, sign * last_b
        buffers: dict[str, Tensor] = {}
        shapes = {"a1": h1, "d1": h1, "t1": h1, "aq": 2 * h2, "d2": h2, "t2": h2}
        if h2 == 0:
            shapes["a1"] = 2 * h1  # [a1 | d1] side by side for the one output product

        def buffer(name: str, n: int) -> Tensor:
            b = buffers.get(name)
            if b is None or b.shape[0] != n:
                b = buffers[name] = torch.empty(n, shapes[name], dtype=dtype, device=device)
            return b

        def g(t: Tensor, y: Tensor) -> Tensor:
            n = y.shape[0]
            feats = torch.tensor(_time_features(sign * float(t), freqs), dtype=dtype,
                                 device=device)
            x = y[:, :d]
            both = buffer("a1", n)
            a1 = both[:, :h1]
            if rows is None:
                torch.addmm(torch.addmv(biases[0], w1t, feats), x, wx_t, out=a1)
            else:
                torch.add(rows, torch.mv(w1t, feats), out=a1).addmm_(x, wx_t)
            if h2 == 0:
                act(a1, both[:, h1:], buffer("t1", n))
                return torch.addmm(last_b, both, last_w)
            d1 = buffer("d1", n)
            act(a1, d1, buffer("t1", n))
            aq = buffer("aq", n)
            a2, p = aq[:, :h2], aq[:, h2:]
            torch.addmm(biases[1], a1, w2_t, out=a2)
            torch.addmm(p_bias, d1, trace_mat, alpha=s, out=p)
            d2 = buffer("d2", n)
            act(a2, d2, buffer("t2", n))
            if c == 0.0:
                p.mul_(d2)
            else:
                p.addcmul_(p, d2, value=s / c)
            return torch.addmm(last_b, aq, last_w)

        return g


class CNF(Layer):
    """A continuous normalizing flow layer: the flow of ``dx/dt = v(t, x, c)`` from t = 0 to 1.

    References: Chen et al., "Neural Ordinary Differential Equations" (2018); Grathwohl et al.,
    "FFJORD" (2019); Lipman et al., "Flow Matching for Generative Modeling" (2023).

    Arguments:
        dim: number of features.
        hidden, activation: the vector field's MLP.
        rtol, atol: the ODE solver's relative and absolute tolerances.
        method: a torchdiffeq adaptive method (``ODE_METHODS``).
        exact_dim: above this dimension, training by likelihood estimates the divergence.
        freqs: time features of the vector field.
        context_dim: size of the optional context vector.

    Example:
        >>> import torch
        >>> from nfcore.layers import CNF
        >>> layer = CNF(2, hidden=[16], rtol=1e-9, atol=1e-9).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x, atol=1e-7) and torch.allclose(ladj, -ladj_inv, atol=1e-7)
        True
    """

    fast_forward = False
    row_wise = False  # its solver stops on a batch-wide rule
    fast_inverse = False
    cost = ("ode", "ode")

    def __init__(self, dim: int, *, hidden: list[int] | None = None, activation: str = "silu",
                 rtol: float = 1e-5, atol: float = 1e-6, method: str = "dopri5",
                 exact_dim: int = 16, freqs: int = 3, context_dim: int = 0, **_):
        super().__init__()
        if method not in ODE_METHODS:
            raise ValueError(f"Expected method in {list(ODE_METHODS)}; got {method!r}")
        self.dim = dim
        self.field = VectorField(dim, list(hidden or [64, 64]), activation, context_dim, freqs)
        self.rtol, self.atol, self.method = rtol, atol, method
        self.exact_dim = exact_dim
        self.evaluations = 0  # vector-field evaluations of the last solve (diagnostics)
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    def _probe(self, x: Tensor) -> Tensor | None:
        depth = len(self.field.linears) - 1
        if not (self.training and torch.is_grad_enabled() and self.dim > self.exact_dim
                and depth > 2):
            return None
        g = torch.Generator().manual_seed(int(self.draws) * 1_000_003 + 29)
        self.draws += 1
        return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)

    def integrate(self, x: Tensor, context: Tensor | None, t0: float,
                  t1: float) -> tuple[Tensor, Tensor]:
        """Solve from ``t0`` to ``t1``: the end state and ``int_{t0}^{t1} div v dt``."""
        from torchdiffeq import odeint

        sign = 1.0 if t1 >= t0 else -1.0
        f = self.field.ode(context, self._probe(x), sign)
        evaluations = 0

        def func(s: Tensor, y: Tensor) -> Tensor:
            nonlocal evaluations
            evaluations += 1
            if evaluations > 20 * _MAX_STEPS:
                raise ConvergenceError(f"cnf: ODE solve took over {20 * _MAX_STEPS} evaluations")
            check_deadline("cnf: ODE solve")
            return f(s, y)

        # One flat state [x, l] (no per-evaluation split and join of a tuple), solved forward in
        # s = sign * t; the error norm is the tuple's (the larger RMS of the two parts). The last
        # step ends on the end time (``step_t``), so the answer is a step whose error was
        # controlled, not torchdiffeq's interpolant inside a step that overshot it.
        times = torch.tensor([sign * t0, sign * t1], dtype=x.dtype, device=x.device)
        state = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
        options = {"max_num_steps": _MAX_STEPS, "norm": mixed_rms_norm(self.dim),
                   "step_t": times[1:]}
        try:
            ys = odeint(func, state, times, rtol=self.rtol, atol=self.atol, method=self.method,
                        options=options)
        except AssertionError as e:  # torchdiffeq's step-size underflow and step limit
            raise ConvergenceError(f"cnf: ODE solve failed ({e})") from None
        self.evaluations = evaluations
        y = ys[-1]
        if not torch.isfinite(y).all():
            raise ConvergenceError("cnf: ODE solve produced non-finite values")
        return y[:, : self.dim].contiguous(), y[:, self.dim].contiguous()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.integrate(x, context, 1.0, 0.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.integrate(z, context, 0.0, 1.0)

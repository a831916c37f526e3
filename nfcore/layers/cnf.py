"""Continuous normalizing flows: ``dx/dt = v(t, x, c)``, solved by torchdiffeq's adaptive solvers.

Time runs from the base (``t = 0``) to the data (``t = 1``), as in flow matching. The log-density
follows ``d log p / dt = -div v``, so scoring integrates ``(x, div v)`` from 1 to 0 and sampling from
0 to 1, each to the spec's ``rtol`` and ``atol`` (torchdiffeq's error control over the whole state,
the log-determinant included: one flat state ``[x, l]`` whose error norm is the larger of the RMS
norms of the ``x`` block and of the ``l`` column, so the log-density is held to the tolerance on its
own; the last step ends on the end time rather than being interpolated).

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

# Imported with nfcore, never lazily: torchdiffeq builds its Butcher tableaux as module-level
# tensors, and a first import inside ``torch.inference_mode`` (a first scoring call) made them
# inference tensors, which every later solve with autograd then refused to use.
from torchdiffeq import odeint

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
    """``(a, d) -> None``: the activation, less a constant ``o``, written over ``a`` and its
    derivative into ``d``, with no allocation (``None`` for activations without such a form).
    Returned with ``o``, which goes into the bias of the next matrix product. For solves without
    autograd, where an elementwise pass over a ``(rows, 64)`` buffer costs about a tenth of a
    ``64 x 64`` matrix product, and an exp or a sigmoid half of one, on one core."""
    if name == "elu":
        def g(a, d):
            torch.clamp(a, max=0.0, out=d).exp_()  # elu' = exp(min(a, 0))
            a.clamp_(min=0.0).add_(d)  # elu + 1 = max(a, 0) + exp(min(a, 0)) (no expm1: slower)
        return g, -1.0
    if name == "silu":
        def g(a, d):
            torch.sigmoid(a, out=d)
            a.mul_(d)  # y = a s
            d.addcmul_(a, d, value=-1.0).add_(a)  # silu' = s (1 + a (1 - s)) = s - y s + y
        return g, 0.0
    if name == "tanh":
        def g(a, d):
            a.tanh_()
            torch.addcmul(a.new_ones(()), a, a, value=-1.0, out=d)  # tanh' = 1 - y^2
        return g, 0.0
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
        reused across evaluations, the time features in double precision on the host, the sign
        and the activation's constant folded into the weights once a solve, and both outputs
        written into the state's layout. Otherwise it is ``dynamics`` (autograd-safe) with its
        two outputs joined."""
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

    def _lean_ode(self, context: Tensor | None, sign: float, act, o: float):
        d, freqs = self.dim, self.freqs
        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias for lin in self.linears]
        w1 = weights[0]
        w1x, w1t = w1[:, :d], w1[:, d : d + 1 + 2 * freqs]
        wx_t = w1x.T
        rows = None if context is None else (biases[0] + context @ w1[:, d + 1 + 2 * freqs :].T)
        h1 = w1.shape[0]
        dtype, device = w1.dtype, w1.device
        # Everything that does not change along the solve, the sign of the time included, is
        # folded into the weights here. Weights stay (out, in) and are read transposed: MKL's
        # kernel for a few output columns is 3-5x slower the other way round.
        w_out = sign * weights[-1]
        b_out = sign * (biases[-1] + o * weights[-1].sum(1))  # the activation came less o
        if len(weights) == 2:
            trace_vec = sign * (w1x * weights[1].T).sum(1)  # div = D1 . tv
        else:
            w2 = weights[1]
            w2_t, b2 = w2.T, biases[1] + o * w2.sum(1)
            # div = D1^T M D2 with M = W2^T * (W1x W3) (h1 x h2), read transposed.
            trace_mat = (sign * (w2 * (w1x @ weights[2]).T)).T
            ones = w2.new_ones(w2.shape[0])
        buffers: dict[str, Tensor] = {}

        def buffer(name: str, n: int, width: int) -> Tensor:
            b = buffers.get(name)
            if b is None or b.shape[0] != n:
                b = buffers[name] = torch.empty(n, width, dtype=dtype, device=device)
            return b

        def g(t: Tensor, y: Tensor) -> Tensor:
            n = y.shape[0]
            feats = torch.tensor(_time_features(sign * float(t), freqs), dtype=dtype,
                                 device=device)
            a1, d1 = buffer("a1", n, h1), buffer("d1", n, h1)
            if rows is None:
                torch.addmm(torch.addmv(biases[0], w1t, feats), y[:, :d], wx_t, out=a1)
            else:
                torch.add(rows, torch.mv(w1t, feats), out=a1).addmm_(y[:, :d], wx_t)
            act(a1, d1)
            out = torch.empty(n, d + 1, dtype=dtype, device=device)  # the solver keeps it
            if len(weights) == 2:
                torch.addmm(b_out, a1, w_out.T, out=out[:, :d])
                torch.mv(d1, trace_vec, out=out[:, d])
                return out
            a2, d2, p = buffer("a2", n, w2.shape[0]), buffer("d2", n, w2.shape[0]), buffer(
                "p", n, w2.shape[0])
            torch.addmm(b2, a1, w2_t, out=a2)
            torch.mm(d1, trace_mat, out=p)
            act(a2, d2)
            torch.addmm(b_out, a2, w_out.T, out=out[:, :d])
            torch.mv(p.mul_(d2), ones, out=out[:, d])  # vecdot allocates a product: slower
            return out

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

"""Invertible residual layers (i-ResNet and Residual Flows): ``z = x + g(x)`` with ``Lip(g) < 1``.

``g`` is an MLP whose linear maps are spectrally normalised and whose activations are LipSwish, so
its Lipschitz constant is at most ``lipschitz`` in ``x`` (the context enters unconstrained). Then
``x -> x + g(x)`` is a bijection: scoring is one pass, and sampling inverts it by Banach fixed-point
iteration, ``x <- z - g(x)``, which contracts at rate ``lipschitz``.

``log|det(I + J_g)|`` is exact up to ``exact_dim`` features: the Jacobian of ``g`` is built in one
forward-mode pass through the MLP (its structure is known, no autograd needed) and its ``slogdet``
taken. Above ``exact_dim`` it is the unbiased Russian-roulette estimate of the power series
``sum_k (-1)^(k+1) tr(J^k) / k`` with Hutchinson's trace (Chen et al. 2019), which the flow labels
as an estimate (``Flow.exact_log_prob``). Training draws its randomness from a counter kept in the
state dict, so runs are reproducible and resumable; scoring uses a fixed seed, so the same point
always gets the same answer.

``Flow.initialize`` (with ``knots``, as ``fit_density`` calls it) starts each LipSwish where the
data bend it (``Residual.initialize_knots``): spectrally normalised wide layers hand each unit a
small slice of the input's spread, and at the default ``beta`` the MLP would start almost linear.

Spectral normalisation follows Miyato et al. (2018) in training: one power iteration per forward
pass, its vectors ``u``, ``v`` kept as buffers (so a checkpoint resumes the same run), and
``W / max(1, sigma / c)`` with ``sigma = u^T W v``. At inference (``.train(False)``) the weight is
divided by its exact largest singular value instead, computed once per weight version and cached:
the bound then holds exactly, which is what the fixed-point inverse needs, and the answer depends on
the weights alone, so it is the same after a safetensors round trip and in every process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConvergenceError
from ..limits import check_deadline
from .base import Layer

__all__ = ["Residual", "LipschitzMLP", "SpectralLinear", "RESIDUAL_TOLERANCE"]

#: Fixed-point stopping rule: ``max|x + g(x) - z| <= tol * (1 + max|z|)`` per row. The error in
#: ``x`` is then at most that divided by ``1 - lipschitz``.
RESIDUAL_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
_MAX_ITERATIONS = 2000
_INIT_POWER_ITERATIONS = 100
_ROULETTE_P = 0.5  # P(stop) at each term of the Russian roulette
_TRAIN_TERMS = 2  # terms always computed in training, before the roulette
_SCORE_TERMS = 10  # and when scoring above exact_dim
_SCORE_PROBES = 4
_SCORE_SEED = 0
_INIT_ROWS = 2048  # rows of data that initialize_knots looks at


class SpectralLinear(nn.Module):
    """A linear map whose weight is scaled to spectral norm at most ``bound``.

    Arguments:
        in_features, out_features: the weight's shape is ``(out_features, in_features)``.
        bound: the largest allowed spectral norm.
        scale: multiplies the initial weight (a small last layer starts ``g`` near zero).
    """

    def __init__(self, in_features: int, out_features: int, bound: float, scale: float = 1.0):
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        # Orthogonal: all singular values equal, so the normalised map passes every direction at
        # its bound, not only the few at the top of a spread-out spectrum.
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(out_features, in_features))
                                   * scale)
        self.bias = nn.Parameter(linear.bias.detach() * scale)
        self.bound = bound
        g = torch.Generator().manual_seed(in_features * 7919 + out_features)
        self.register_buffer("u", F.normalize(torch.randn(out_features, generator=g), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features, generator=g), dim=0))
        self._cache: tuple[tuple, float] | None = None
        self._power_iteration(_INIT_POWER_ITERATIONS)

    @torch.no_grad()
    def _power_iteration(self, n: int) -> None:
        w, u, v = self.weight.detach(), self.u, self.v
        for _ in range(n):
            v = F.normalize(w.T @ u, dim=0, eps=1e-12)
            u = F.normalize(w @ v, dim=0, eps=1e-12)
        self.u.copy_(u)
        self.v.copy_(v)

    def _exact_sigma(self) -> float:
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            sigma = torch.linalg.matrix_norm(w.detach().double(), ord=2)
            self._cache = (key, float(sigma))
        return self._cache[1]

    def normalized_weight(self) -> Tensor:
        """The weight divided by ``max(1, sigma / bound)``; one power iteration in training."""
        if self.training:
            self._power_iteration(1)
            # Clones: the next forward pass updates u and v in place before this one's backward.
            sigma = self.u.clone() @ self.weight @ self.v.clone()
            return self.weight / torch.clamp(sigma / self.bound, min=1.0)
        return self.weight / max(1.0, self._exact_sigma() / self.bound)


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with a learned ``beta > 0``: 1-Lipschitz for every beta
    (Chen et al. 2019, §4.1), smooth, and not saturating like tanh."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus -> 1

    def value_and_derivative(self, a: Tensor) -> tuple[Tensor, Tensor]:
        beta = F.softplus(self.beta)
        s = torch.sigmoid(beta * a)
        return a * s / 1.1, (s + beta * a * s * (1.0 - s)) / 1.1


class LipschitzMLP(nn.Module):
    """``g(x, c)``: spectrally normalised linear maps and LipSwish, ``Lip_x(g) <= lipschitz``.

    Each of the ``L`` linear maps gets the bound ``lipschitz ** (1 / L)``; LipSwish is 1-Lipschitz.
    A context enters the first layer through an unconstrained linear map.
    """

    def __init__(self, dim: int, hidden: list[int], lipschitz: float, context_dim: int = 0):
        super().__init__()
        widths = [dim, *hidden, dim]
        bound = lipschitz ** (1.0 / (len(widths) - 1))
        self.linears = nn.ModuleList(
            SpectralLinear(a, b, bound, scale=0.1 if i == len(widths) - 2 else 1.0)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)))
        self.activations = nn.ModuleList(LipSwish() for _ in hidden)
        self.context = nn.Linear(context_dim, hidden[0], bias=False) if context_dim else None

    def weights(self) -> list[tuple[Tensor, Tensor]]:
        """The normalised ``(weight, bias)`` of every layer; compute once per layer call."""
        return [(lin.normalized_weight(), lin.bias) for lin in self.linears]

    def evaluate(self, x: Tensor, context: Tensor | None,
                 weights: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
        """``g(x)`` and the activation derivatives at every hidden layer (for Jacobians)."""
        h, derivatives = x, []
        for i, (act, (w, b)) in enumerate(zip(self.activations, weights, strict=False)):
            a = h @ w.T + b
            if i == 0 and self.context is not None:
                a = a + self.context(context)
            h, d = act.value_and_derivative(a)
            derivatives.append(d)
        w, b = weights[-1]
        return h @ w.T + b, derivatives

    @staticmethod
    def jvp(weights: list[tuple[Tensor, Tensor]], derivatives: list[Tensor], v: Tensor) -> Tensor:
        """``J_g v`` for tangents ``v`` of shape ``(N, dim)`` or ``(N, P, dim)``."""
        for (w, _), d in zip(weights[:-1], derivatives, strict=True):
            v = (v @ w.T) * (d if v.ndim == 2 else d[:, None])
        return v @ weights[-1][0].T

    @staticmethod
    def jacobian(weights: list[tuple[Tensor, Tensor]], derivatives: list[Tensor]) -> Tensor:
        """The transposed Jacobian ``(dg/dx)^T``, shape ``(N, dim, dim)``, in one forward-mode
        pass. Transposed, each layer is one matrix product over ``N * dim`` rows (not a batch of
        small ones), which matters most for the backward pass; determinants do not mind."""
        jt = weights[0][0].T * derivatives[0][:, None, :]
        for (w, _), d in zip(weights[1:-1], derivatives[1:], strict=True):
            jt = (jt @ w.T) * d[:, None, :]
        return jt @ weights[-1][0].T


class Residual(Layer):
    """An invertible residual layer, ``z = x + g(x)``, with ``Lip(g) <= lipschitz < 1``.

    Scoring (data to latent) is one pass; sampling solves ``x = z - g(x)`` by fixed-point
    iteration to ``RESIDUAL_TOLERANCE`` and raises ``ConvergenceError`` if it does not get there.
    Gradients through the solve are implicit: the incoming gradient is mapped through
    ``(I + J_g)^-T`` by a second, equally contractive fixed-point iteration on vector-Jacobian
    products, so reverse-KL training works without backpropagating through the iterations.

    References: Behrmann et al., "Invertible Residual Networks" (2019); Chen et al., "Residual Flows
    for Invertible Generative Modeling" (2019); Miyato et al., "Spectral Normalization for
    Generative Adversarial Networks" (2018).

    Arguments:
        dim: number of features.
        hidden: hidden widths of ``g``.
        lipschitz: the bound on ``Lip(g)``, in (0, 1); closer to 1 is more expressive and slower
            to invert.
        exact_dim: the largest ``dim`` whose log-determinant is computed exactly; above it, it is
            estimated (and labelled as such).
        context_dim: size of the optional context vector.

    Example:
        >>> import torch
        >>> from nfcore.layers import Residual
        >>> layer = Residual(3, hidden=[16]).double().train(False)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> z, ladj = layer(x)
        >>> x_back, ladj_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x) and torch.allclose(ladj, -ladj_inv)
        True
    """

    fast_inverse = False
    row_wise = False  # its solver stops on a batch-wide rule

    def __init__(self, dim: int, *, hidden: list[int] | None = None, lipschitz: float = 0.97,
                 exact_dim: int = 16, context_dim: int = 0, **_):
        super().__init__()
        self.dim = dim
        self.lipschitz = lipschitz
        self.exact = dim <= exact_dim
        self.g = LipschitzMLP(dim, list(hidden or [64, 64]), lipschitz, context_dim)
        # How many random estimates training has drawn: seeds the next, so a resumed run repeats.
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ data-dependent start
    @torch.no_grad()
    def initialize_knots(self, x: Tensor, context: Tensor | None = None) -> None:
        """Put the bends of ``g``'s activations where the data are (``Flow.initialize``, as the
        splines' knots). Behind a spectrally normalised map of width ``h`` each unit sees about
        ``1 / sqrt(h)`` of its input's spread, so with the default ``beta`` LipSwish works in its
        near-linear stretch (slope about 1/2 everywhere) and ``g`` is close to a linear map. Layer
        by layer, ``beta`` is set to one over the units' mean spread on ``x`` (LipSwish then bends
        across the data), and each unit's bias so that its bend sits at a quantile of its own
        pre-activations drawn uniformly in [0.1, 0.9] (bends spread over the data, not all at its
        centre). Neither touches the Lipschitz bound: ``beta`` and the biases are free in it."""
        if x.shape[0] < 2:
            return
        stride = max(1, x.shape[0] // _INIT_ROWS)
        rows = x[::stride]
        ctx = None if context is None else context[::stride]
        g = torch.Generator().manual_seed(self.dim * 104_729 + len(self.g.linears))
        weights = self.g.weights()
        h = rows
        for i, (act, lin, (w, _)) in enumerate(zip(self.g.activations, self.g.linears, weights,
                                                   strict=False)):
            a = h @ w.T
            if i == 0 and self.g.context is not None:
                a = a + self.g.context(ctx)
            spread = float(a.std(0).mean())
            if not math.isfinite(spread) or spread <= 1e-12:
                return
            q = 0.1 + 0.8 * torch.rand(a.shape[1], generator=g, dtype=torch.float64)
            bends = torch.quantile(a.double(), q, dim=0).diagonal()
            lin.bias.copy_(-bends.to(lin.bias))
            beta = min(1.0 / spread, 1e4)
            act.beta.fill_(beta if beta > 30.0 else math.log(math.expm1(beta)))  # softplus^-1
            h, _ = act.value_and_derivative(a + lin.bias)

    # ------------------------------------------------------------------ log-determinant
    def _log_det(self, weights: list, derivatives: list[Tensor], n: int, like: Tensor) -> Tensor:
        """``log|det(I + J_g)|`` at the points whose activation derivatives are given."""
        if self.exact:
            j = LipschitzMLP.jacobian(weights, derivatives)
            if self.dim <= 2:  # closed forms: batched LU of tiny matrices is slow on CPU
                if self.dim == 1:
                    return torch.log1p(j[:, 0, 0])
                return torch.log((1.0 + j[:, 0, 0]) * (1.0 + j[:, 1, 1]) - j[:, 0, 1] * j[:, 1, 0])
            eye = torch.eye(self.dim, dtype=j.dtype, device=j.device)
            return torch.linalg.slogdet(eye + j)[1]
        if self.training and torch.is_grad_enabled():
            g = torch.Generator().manual_seed(int(self.draws) * 1_000_003 + 17)
            self.draws += 1
            probes = torch.randn(n, 1, self.dim, generator=g, dtype=like.dtype)
            exact_terms = _TRAIN_TERMS
        else:
            g = torch.Generator().manual_seed(_SCORE_SEED)
            probes = torch.randn(1, _SCORE_PROBES, self.dim, generator=g, dtype=like.dtype)
            probes = probes.expand(n, -1, -1)
            exact_terms = _SCORE_TERMS
        extra = _geometric(g, _ROULETTE_P)
        probes = probes.to(like.device)
        w, total = probes, like.new_zeros(n)
        for k in range(1, exact_terms + extra + 1):
            w = LipschitzMLP.jvp(weights, derivatives, w)
            weight = 1.0 if k <= exact_terms else (1.0 - _ROULETTE_P) ** -(k - exact_terms)
            trace = (probes * w).sum(-1).mean(-1)
            total = total + ((-1) ** (k + 1)) * weight / k * trace
        return total

    # ------------------------------------------------------------------ directions
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        weights = self.g.weights()
        gx, derivatives = self.g.evaluate(x, context, weights)
        return x + gx, self._log_det(weights, derivatives, x.shape[0], x)

    @torch.no_grad()
    def _solve(self, z: Tensor, context: Tensor | None, weights: list) -> Tensor:
        tol = RESIDUAL_TOLERANCE.get(z.dtype, 1e-5)
        x = z.clone()
        active = torch.arange(z.shape[0], device=z.device)
        scale = tol * (1.0 + z.abs().amax(-1))
        worst = math.inf
        for _ in range(_MAX_ITERATIONS):
            if active.numel() == 0:
                return x
            check_deadline("residual: fixed-point inverse")
            za, ca = z[active], None if context is None else context[active]
            new = za - self.g.evaluate(x[active], ca, weights)[0]
            step = (new - x[active]).abs().amax(-1)
            if not torch.isfinite(step).all():
                raise ConvergenceError("residual: fixed-point inverse met non-finite values")
            x[active] = new
            done = step <= scale[active]
            worst = float(step.max())
            active = active[~done]
        if active.numel() == 0:
            return x
        raise ConvergenceError(f"residual: fixed-point inverse did not converge in "
                               f"{_MAX_ITERATIONS} iterations (residual {worst:.3g} for "
                               f"{active.numel()} rows)")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        weights = self.g.weights()
        x = self._solve(z, context, [(w.detach(), b.detach()) for w, b in weights])
        if torch.is_grad_enabled() and (z.requires_grad or any(
                p.requires_grad for p in self.parameters())):
            x = self._implicit(x, z, context, weights)
        _, derivatives = self.g.evaluate(x, context, weights)
        return x, -self._log_det(weights, derivatives, x.shape[0], x)

    def _implicit(self, x: Tensor, z: Tensor, context: Tensor | None, weights: list) -> Tensor:
        """``x = z - g(x*)`` with the gradient of the fixed point: the hook maps the incoming
        gradient ``y`` to the solution of ``a = y - J_g^T a``, i.e. ``(I + J_g)^-T y``."""
        x0 = x.detach().requires_grad_()
        with torch.enable_grad():
            gx0 = self.g.evaluate(x0, context, weights)[0]
        out = z - gx0
        tol = RESIDUAL_TOLERANCE.get(z.dtype, 1e-5)

        def hook(grad: Tensor) -> Tensor:
            a = grad
            for _ in range(_MAX_ITERATIONS):
                check_deadline("residual: implicit gradient")
                jt_a = torch.autograd.grad(gx0, x0, a, retain_graph=True)[0]
                new = grad - jt_a
                if float((new - a).abs().max()) <= tol * (1.0 + float(grad.abs().max())):
                    return new
                a = new
            raise ConvergenceError("residual: implicit gradient did not converge")

        if out.requires_grad:
            out.register_hook(hook)
        return out


def _geometric(g: torch.Generator, p: float) -> int:
    """Number of failures before the first success, each trial succeeding with probability p."""
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    return int(math.floor(math.log1p(-u) / math.log1p(-p)))

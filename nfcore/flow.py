"""``Flow``: a standard normal base and an ordered list of layers, built from a spec."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ShapeError
from .layers import LAYER_CLASSES, MLP, Layer
from .layers.base import eager_inference, lean
from .spec import CONDITIONAL, normalize_spec

__all__ = ["Flow", "ContextEmbedding", "build"]

_COSTS = ("one pass", "iterative", "ode")  # in increasing order
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ContextEmbedding(nn.Module):
    """The spec's ``"embedding"``: raw context ``(N, context_dim)`` -> ``(N, features)``, through a
    fixed standardization (``loc``, ``scale``: buffers that ``Flow.initialize_context`` sets from
    training contexts; 0 and 1 until then) and an MLP."""

    def __init__(self, context_dim: int, *, features: int, hidden: list[int], activation: str):
        super().__init__()
        self.register_buffer("loc", torch.zeros(context_dim))
        self.register_buffer("scale", torch.ones(context_dim))
        self.net = MLP(context_dim, features, hidden, activation)

    def forward(self, context: Tensor) -> Tensor:
        return self.net((context - self.loc) / self.scale)


class Flow(nn.Module):
    """A normalizing flow ``x = T(z)``, ``z ~ N(0, I)``, with exact ``log_prob`` and one-pass
    ``sample_and_log_prob``.

    Arguments:
        spec: a flow spec (see ``nfcore.spec``); it is normalized and kept as ``flow.spec``.

    Example:
        >>> import nfcore, torch
        >>> flow = nfcore.build({"preset": "nsf", "dim": 2, "transforms": 2, "hidden": [16]})
        >>> x, log_q = flow.sample_and_log_prob(4, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(flow.log_prob(x), log_q, atol=1e-4)
        True
    """

    #: Without autograd, on a CPU, ``log_prob`` and ``sample_from_noise`` run a large batch in
    #: blocks of this many rows, so that a block's activations stay in cache (the lean inference
    #: path, see ``benchmarks/results/roofline.md``); the flows whose solvers stop on a batch-wide
    #: rule (``Layer.row_wise`` False), and those with no dense layer, run whole.
    block_rows: int = 8192

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        #: False: the inference passes run the plain training-path kernels, unblocked (the
        #: reference the lean path is tested against; see ``nfcore.layers.base.lean``).
        self.fast_inference = True
        self.spec = normalize_spec(spec)
        self.dim: int = self.spec["dim"]
        self.context_dim: int = self.spec["context_dim"]
        self.metadata: dict[str, str] = {}
        embedding = self.spec.get("embedding")
        #: The context embedding network (``None`` without one): conditional layers see its output.
        self.embedding = (ContextEmbedding(self.context_dim, **embedding) if embedding else None)
        layer_context = embedding["features"] if embedding else self.context_dim
        layers = []
        for layer in self.spec["layers"]:
            params = {k: v for k, v in layer.items() if k != "type"}
            if layer["type"] in CONDITIONAL:
                params["context_dim"] = layer_context
            layers.append(LAYER_CLASSES[layer["type"]](self.dim, **params))
        self.layers: nn.ModuleList[Layer] = nn.ModuleList(layers)
        # Row blocks pay where a row's intermediates are wide (a conditioner's hidden layers) and
        # where every layer is row-wise; without a dense layer they would add only overhead.
        self._blocked = (all(layer.row_wise for layer in layers)
                         and any(isinstance(m, nn.Linear) for m in self.modules()))
        self.to(_DTYPES[self.spec["dtype"]])

    # ---------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.spec["dtype"]]

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():  # cheap: no state_dict() per call (the batcher asks often)
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def fast_log_prob(self) -> bool:
        """True when scoring takes one pass per layer (no sequential or iterative layer)."""
        return all(layer.fast_forward for layer in self.layers)

    @property
    def fast_sample(self) -> bool:
        """True when sampling takes one pass per layer."""
        return all(layer.fast_inverse for layer in self.layers)

    @property
    def cost(self) -> dict[str, str]:
        """What ``log_prob`` and sampling cost, each the most expensive of its layers':
        ``"one pass"``, ``"iterative"`` (a numerical solve, or a pass per feature) or ``"ode"``.

        Example:
            >>> import nfcore
            >>> nfcore.build({"preset": "resflow", "dim": 2, "hidden": [8]}).cost
            {'log_prob': 'one pass', 'sample': 'iterative'}
        """
        def worst(costs: list[str]) -> str:
            return max(costs, key=_COSTS.index, default="one pass")
        return {"log_prob": worst([layer.cost[0] for layer in self.layers]),
                "sample": worst([layer.cost[1] for layer in self.layers])}

    @property
    def exact_log_prob(self) -> bool:
        """True when ``log_prob`` is exact (to the stated solver tolerances); False when some
        layer's log-determinant is a stochastic estimate (a residual layer above its
        ``exact_dim``)."""
        return all(layer.exact for layer in self.layers)

    # ---------------------------------------------------------------- checks
    def _points(self, x: Any) -> Tensor:
        x = torch.as_tensor(x)
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise ShapeError(f"Expected a real-valued array; got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ShapeError(f"Expected x of shape (N, {self.dim}); got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=self.dtype)

    def _context(self, context: Any, n: int) -> Tensor | None:
        if self.context_dim == 0:
            if context is not None:
                raise ShapeError("This flow takes no context; got one")
            return None
        if context is None:
            raise ShapeError(f"This flow needs a context of shape (N, {self.context_dim})")
        c = torch.as_tensor(context).to(device=self.device, dtype=self.dtype)
        if c.ndim == 1:
            c = c[None]
        if c.ndim != 2 or c.shape[-1] != self.context_dim or c.shape[0] not in (1, n):
            raise ShapeError(f"Expected context of shape ({n}, {self.context_dim}) or "
                             f"({self.context_dim},); got {tuple(c.shape)}")
        return c.expand(n, -1)

    def embed(self, context: Tensor | None) -> Tensor | None:
        """What the conditional layers see of a raw context: the embedding network's output, or
        the context itself without one. ``transform``, ``sample_from_noise`` and ``initialize``
        call it; code that runs the layers itself must too."""
        if context is None or self.embedding is None:
            return context
        return self.embedding(context)

    @torch.no_grad()
    def initialize_context(self, context: Any) -> Flow:
        """Set the embedding's context standardization from contexts ``(N, context_dim)`` (their
        mean and sd; a constant column keeps scale 1). No effect without an embedding."""
        if self.embedding is None:
            return self
        c = torch.as_tensor(context).to(device=self.device, dtype=self.dtype)
        if c.ndim != 2 or c.shape[-1] != self.context_dim or c.shape[0] < 1:
            raise ShapeError(f"Expected contexts of shape (N, {self.context_dim}); got "
                             f"{tuple(c.shape)}")
        sd = c.std(0) if c.shape[0] > 1 else torch.ones_like(c[0])
        self.embedding.loc.copy_(c.mean(0))
        self.embedding.scale.copy_(torch.where(sd > 1e-12, sd, torch.ones_like(sd)))
        return self

    # ---------------------------------------------------------------- density and sampling
    def base_log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * math.log(2.0 * math.pi)

    def transform(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map data to latent: ``(z, log|det dz/dx|)``. No argument checks: an inner-loop method."""
        ladj = x.new_zeros(x.shape[0])
        context = self.embed(context)
        for layer in self.layers:
            x, l = layer(x, context)
            ladj = ladj + l
        return x, ladj

    def _log_prob(self, x: Tensor, context: Tensor | None) -> Tensor:
        z, ladj = self.transform(x, context)
        return self.base_log_prob(z) + ladj

    def _inference(self, fn, x: Tensor, context: Tensor | None):
        """``fn(x, context)``; without autograd, in row blocks (lean path) or under
        ``eager_inference`` (``fast_inference`` False)."""
        if not self.fast_inference:
            with eager_inference():
                return fn(x, context)
        step = self.block_rows
        if not lean() or x.shape[0] <= step or x.device.type != "cpu" or not self._blocked:
            return fn(x, context)  # (a GPU wants the whole batch at once)
        parts = [fn(x[i : i + step], None if context is None else context[i : i + step])
                 for i in range(0, x.shape[0], step)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) for p in zip(*parts, strict=True))
        return torch.cat(parts)

    def log_prob(self, x: Any, context: Any = None) -> Tensor:
        """Exact log density of ``x`` (shape ``(N, dim)``) in the data's own units."""
        x = self._points(x)
        return self._inference(self._log_prob, x, self._context(context, x.shape[0]))

    def sample_and_log_prob(
        self,
        n: int,
        *,
        context: Any = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``n`` samples and their log density, in one pass through the layers' inverses."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ShapeError(f"Expected a non-negative integer n; got {n!r}")
        ctx = self._context(context, n)
        # The noise is drawn where the generator lives (a CPU generator drives a flow on any
        # device, so that a seed means the same draws everywhere) and then moved.
        where = self.device if generator is None else generator.device
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=where)
        return self.sample_from_noise(z.to(self.device), ctx)

    def sample_from_noise(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Push base noise ``z`` through the flow: ``(x, log q(x))``. Lets callers own the noise."""
        return self._inference(self._sample_from_noise, z, context)

    def _sample_from_noise(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        log_q = self.base_log_prob(z)
        context = self.embed(context)
        for layer in reversed(self.layers):
            z, l = layer.inverse(z, context)
            log_q = log_q - l
        return z, log_q

    @torch.inference_mode()
    def warm_up(self, rows: int = 256) -> Flow:
        """Run each one-pass inference direction once on ``rows`` rows, so that the first real
        request does not pay for the lean path's cached weights or the kernels' first-call set-up
        (a server calls this when it loads a model). The iterative and ODE directions are left
        alone: their cost is their solve, and a warm-up could not bound it."""
        ctx = (None if self.context_dim == 0 else
               torch.zeros(rows, self.context_dim, dtype=self.dtype, device=self.device))
        z = torch.zeros(rows, self.dim, dtype=self.dtype, device=self.device)
        if self.cost["log_prob"] == "one pass":
            self._inference(self._log_prob, z, ctx)
        if self.cost["sample"] == "one pass":
            self._inference(self._sample_from_noise, z, ctx)
        return self

    def sample(self, n: int, *, context: Any = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, shape ``(n, dim)``."""
        return self.sample_and_log_prob(n, context=context, generator=generator)[0]

    @torch.no_grad()
    def initialize(self, x: Any, context: Any = None, *, knots: bool = True) -> Flow:
        """Fit the data-dependent layers (``standardize``, ``actnorm``) to the data ``x``, in order,
        each on the output of the layers before it. With ``knots``, also set each spline layer's
        knots so that it maps the marginals of its own input towards a standard normal, the same for
        every row (its conditioner's output weights zeroed: see ``layers.spline_start``; a
        starting point for training, which overwrites what training had learned there), and each
        residual layer's activation bends (``Residual.initialize_knots``). With a
        context embedding, its standardization is set from ``context`` first."""
        h = self._points(x)
        ctx = self._context(context, h.shape[0])
        if ctx is not None:
            self.initialize_context(ctx)
            ctx = self.embed(ctx)
        for layer in self.layers:
            if hasattr(layer, "initialize"):
                layer.initialize(h)
            if knots and hasattr(layer, "initialize_knots"):
                layer.initialize_knots(h, ctx)
            h, _ = layer(h, ctx)
        return self


def build(spec: dict[str, Any]) -> Flow:
    """Build a ``Flow`` from a JSON spec; raises ``SpecError`` naming the offending field."""
    return Flow(spec).train(False)

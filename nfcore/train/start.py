"""A starting point taken from the target itself: Pathfinder-style Gaussian approximations along an
L-BFGS path (Zhang, Carpenter, Gelman & Vehtari 2022), so that a fit reaches targets whose mass
lies at any location, scale or correlation without hand tuning.

``pathfinder`` runs L-BFGS on ``-log p~`` from the origin (or, when the origin is outside the
target's support, from Stan-style uniform(-2, 2) draws), keeping every iterate. At some of them it
forms the Gaussian approximation ``N(x_k + H_k^{-1} grad log p~(x_k), H_k^{-1})`` from the exact
Hessian (made positive definite: negative curvature flipped, tiny curvature floored), scores each
with the same draws, and returns the best, next to ``N(0, I)``, the flow's own starting point: the highest lower confidence bound on
the importance-sampling estimate of ``log Z`` (see ``pathfinder``). Choosing by a
score rather than taking the mode keeps a funnel or a ring from drawing the start to a degenerate
point. The leader is then refined by Gaussian variational inference (a few hundred Adam steps on
the ELBO, ``_refine``) and the result competes as one more candidate: where the mode is not where
the mass is (a hierarchical model), no Laplace candidate is near the posterior, and that step is.
``gaussian_samples`` then turns the winner into pseudo-data with exactly its mean and covariance,
for ``Flow.initialize`` to set the data-side layers from (``standardize``, ``loc_scale``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..targets import Target

__all__ = ["GaussianStart", "pathfinder", "gaussian_samples", "other_modes"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class GaussianStart:
    """A Gaussian ``N(mean, factor @ factor.T)`` (float64) and what the search found on the way.

    ``elbo`` is its ELBO estimate; ``mode_log_prob`` the highest ``log p~`` seen along the path
    (``None`` when no finite value was seen); ``info`` is JSON for the training summary;
    ``modes`` the Laplace approximations ``(mean, factor)`` at other modes that further L-BFGS
    paths reached, well apart from this Gaussian (see ``other_modes``), for ``missing_mass``
    to look at.
    """

    mean: Tensor
    factor: Tensor
    elbo: float
    mode_log_prob: float | None
    info: dict[str, Any] = field(default_factory=dict)
    modes: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def log_prob(self, x: Tensor, df: int | None = None) -> Tensor:
        """Its log density at ``x`` (shape ``(N, dim)``); with ``df``, that of the multivariate
        Student-t with ``df`` degrees of freedom and the same location and scale matrix."""
        factor = self.factor.to(x.device)  # x may live on the flow's device
        eps = torch.linalg.solve(factor, (x.double() - self.mean.to(x.device)).T).T
        _, logdet = torch.linalg.slogdet(factor)
        d = x.shape[-1]
        q = (eps * eps).sum(-1)
        if df is None:
            return -0.5 * q - 0.5 * d * _LOG_2PI - logdet
        return (math.lgamma(0.5 * (df + d)) - math.lgamma(0.5 * df) - 0.5 * d * math.log(df * math.pi)
                - logdet - 0.5 * (df + d) * torch.log1p(q / df))

    def sample(self, n: int, generator: torch.Generator | None = None,
               df: int | None = None) -> Tensor:
        """``n`` draws, shape ``(n, dim)``, float64; with ``df``, from the Student-t (see
        ``log_prob``)."""
        eps = torch.randn(n, self.mean.shape[0], generator=generator, dtype=torch.float64)
        if df is not None:
            chi2 = torch.randn(n, df, generator=generator, dtype=torch.float64).square().sum(-1)
            eps = eps * torch.sqrt(df / chi2)[:, None]
        return self.mean + eps @ self.factor.T


def _log_density(target: Target) -> Callable[[Tensor], Tensor]:
    """``log p~`` in float64 when the target computes in float64, else through float32."""
    probe = torch.zeros(1, target.dim, dtype=torch.float64)
    try:
        if target.log_prob(probe).dtype == torch.float64:
            return target.log_prob
    except (RuntimeError, TypeError):
        pass
    return lambda x: target.log_prob(x.to(torch.float32)).to(torch.float64)


def _start_point(log_p: Callable[[Tensor], Tensor], dim: int, g: torch.Generator) -> Tensor | None:
    candidates = [torch.zeros(dim, dtype=torch.float64)]
    candidates += [4.0 * torch.rand(dim, generator=g, dtype=torch.float64) - 2.0 for _ in range(20)]
    for x in candidates:
        with torch.no_grad():
            value = log_p(x[None])[0]
        if torch.isfinite(value):
            return x
    return None


def _lbfgs_path(log_p: Callable[[Tensor], Tensor], x0: Tensor, max_iterations: int,
                deadline: float) -> tuple[list[Tensor], list[float]]:
    """L-BFGS iterates on ``-log p~`` from ``x0`` (itself included), with their ``log p~``.

    scipy's L-BFGS-B, whose curvature-pair test is relative, so that it converges at any scale
    (torch's skips pairs with ``s.y <= 1e-10``, which stalls on a target of scale 1e-3).
    """
    from scipy.optimize import minimize  # a 1 s import; only fits from a target need it

    path, values = [x0.clone()], [float(log_p(x0[None])[0])]

    def fun(v):
        x = torch.from_numpy(v).requires_grad_(True)
        value = -log_p(x[None])[0]
        if not torch.isfinite(value):  # outside the support: a wall the line search backs off
            return 1e300, (0.0 * v)
        (grad,) = torch.autograd.grad(value, x)
        if not torch.isfinite(grad).all():
            return 1e300, (0.0 * v)
        return float(value.detach()), grad.numpy()

    class _Stop(Exception):
        pass

    def callback(intermediate_result) -> None:
        x, value = intermediate_result.x, -float(intermediate_result.fun)
        if math.isfinite(value) and value > -1e299:
            path.append(torch.from_numpy(x.copy()))
            values.append(value)
        if time.monotonic() > deadline:
            raise _Stop

    try:
        minimize(fun, x0.numpy(), jac=True, method="L-BFGS-B", callback=callback,
                 options={"maxiter": max_iterations, "maxcor": 10, "gtol": 0.0, "ftol": 1e-12})
    except (_Stop, ValueError, RuntimeError, FloatingPointError):
        pass
    return path, values


def _laplace(log_p: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, float] | None:
    """``(mean, factor, log|det factor|)`` of the Gaussian approximation at ``x``: covariance
    ``H^{-1}`` (``factor @ factor.T``), ``H`` the Hessian of ``-log p~`` made positive definite, and
    mean ``x + H^{-1} grad log p~(x)``, Pathfinder's, one Newton step on from ``x``: the mode itself
    for a Gaussian target, wherever along the path ``x`` is."""
    def f(v: Tensor) -> Tensor:
        return -log_p(v[None])[0]

    try:
        h = torch.autograd.functional.hessian(f, x, vectorize=True)
    except RuntimeError:
        try:
            h = torch.autograd.functional.hessian(f, x)
        except RuntimeError:
            return None
    v = x.clone().requires_grad_(True)
    try:
        (grad,) = torch.autograd.grad(log_p(v[None])[0], v)
    except RuntimeError:
        return None
    if not (torch.isfinite(h).all() and torch.isfinite(grad).all()):
        return None
    lam, vec = torch.linalg.eigh(0.5 * (h + h.T))
    lam = lam.abs()
    top = float(lam.max())
    if not math.isfinite(top) or top <= 0.0:
        return None
    lam = lam.clamp(min=1e-14 * top)  # float64's eigh resolves about 1e-15 of the largest
    factor = vec * lam.rsqrt()
    mean = x + factor @ (factor.T @ grad)
    return mean, factor, float(-0.5 * lam.log().sum())


#: Below this estimate of KL(leader || target), in nats, the leader is not refined.
EXACT_KL = 1e-3
#: Above this dimension the refinement's scale matrix is diagonal (a full one costs O(dim^2)).
REFINE_FULL_RANK_MAX_DIM = 64


def _refine(log_p: Callable[[Tensor], Tensor], mean: Tensor, factor: Tensor, logdet: float,
            g: torch.Generator, deadline: float, steps: int = 300, draws: int = 64,
            lr: float = 0.05) -> tuple[Tensor, Tensor, float] | None:
    """Gaussian variational inference (ADVI: the reparametrised ELBO, by Adam) from ``N(mean,
    factor @ factor.T)``, in that Gaussian's whitened coordinates: ``x = mean + factor (a + B
    eps)`` with ``a`` from 0 and ``B`` lower-triangular from ``I`` (diagonal above
    ``REFINE_FULL_RANK_MAX_DIM``), so that its steps are in units of the start's sd whatever the
    target's scale. Returns ``(mean, factor, log|det factor|)``, or ``None`` when no step was
    finite.

    Pathfinder's candidates are Laplace approximations along the path to the mode, and on a
    hierarchical model the mode is not where the mass is: on eight schools (non-centred) it sits at
    a group scale of 29 where the posterior's median is 2.7, every candidate's ELBO is 25 nats
    below ``N(0, I)``'s, and ``N(0, I)`` wins while the mean ``mu`` is 4.4 ± 3.3. A flow starting
    there must carry ``mu`` 4 of its own sds at the training learning rate, and with splines whose
    interval is ``[-5, 5]`` of the start it did not (0.3 sd off after 60 s, with every diagnostic
    fine). This step finds the Gaussian the flow's own objective prefers."""
    dim = mean.shape[0]
    full = dim <= REFINE_FULL_RANK_MAX_DIM
    shift = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    log_diag = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    lower = torch.zeros(dim, dim, dtype=torch.float64, requires_grad=full)
    params = [shift, log_diag] + ([lower] if full else [])
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def scale() -> Tensor:
        return torch.diag(log_diag.exp()) + (torch.tril(lower, -1) if full else 0.0)

    moved = False
    for _ in range(steps):
        if time.monotonic() > deadline:
            break
        eps = torch.randn(draws, dim, generator=g, dtype=torch.float64)
        x = mean + (shift + eps @ scale().T) @ factor.T
        loss = -(log_p(x).mean() + log_diag.sum())
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                torch.nn.utils.clip_grad_norm_(params, 10.0 * math.sqrt(dim))
                opt.step()
                moved = True
        schedule.step()
    if not moved:
        return None
    with torch.no_grad():
        return (mean + factor @ shift, factor @ scale(), logdet + float(log_diag.sum()))


def _eligible(candidates: list, dim: int) -> list:
    """The candidates whose ELBO is within ``elbo_margin(dim)`` of the best (all when none is):
    only they compete on the bound. A Gaussian far wider than the target (a Newton step from an
    early iterate, where the curvature is nearly flat) can estimate log Z well from a few lucky
    draws while most of its draws sit where the target is astronomically small (on eight schools:
    an ELBO of -5e14)."""
    top_elbo = max(value[2] for value, *_ in candidates)
    return [c for c in candidates if c[0][2] >= top_elbo - elbo_margin(dim)] or candidates


#: The candidate index of the refined Gaussian (iterates are 0, 1, ...; ``N(0, I)`` is -1).
_REFINED = -2


def _describe(index: int, n: int) -> str:
    return "N(0, I)" if index == -1 else f"iterate {index} of {n - 1}"


def elbo_margin(dim: int) -> float:
    """How far (nats) below the best ELBO a start candidate may be and still compete on its bound
    on log Z: ``10 + 2 dim``. A wider, covering Gaussian than the best-ELBO one costs some nats of
    ELBO; one that puts most draws where the target is negligible costs far more."""
    return 10.0 + 2.0 * dim


def pathfinder(
    target: Target,
    *,
    seed: int = 0,
    draws: int = 512,
    max_iterations: int = 1000,
    max_candidates: int = 24,
    max_seconds: float = 60.0,
) -> GaussianStart | None:
    """The best Gaussian approximation of ``target`` along an L-BFGS path, next to ``N(0, I)``;
    ``None`` when no point of finite ``log p~`` is found.

    "Best" is, among the candidates whose ELBO is within ``elbo_margin(dim)`` of the best ELBO,
    the highest lower confidence bound on ``log Z`` from importance sampling with the same
    draws for every candidate: the estimate ``log mean(w)`` less twice its relative standard error,
    ``sqrt(1/ESS - 1/draws)``. The estimate prefers approximations that cover the target's mass,
    and the bound keeps a wide one whose estimate rests on a draw or two from winning by luck.
    Pathfinder's choice, the highest ELBO, prefers approximations that avoid the target's
    low-density regions; on a hierarchical model (eight schools) it let every Laplace approximation
    lose to ``N(0, I)``, which left one parameter's mass out of reach.

    The leader among the eligible candidates is then refined by Gaussian variational inference
    (``_refine``: up to 300 Adam steps on the reparametrised ELBO, within ``max_seconds``), and the
    refined Gaussian competes on the same score; ``info["chosen"]`` says which won.

    Arguments:
        target: the unnormalized log density.
        seed: the seed of the start points and of the ELBO draws.
        draws: draws per ELBO estimate (the same draws for every candidate).
        max_iterations: L-BFGS iterations at most.
        max_candidates: Laplace approximations evaluated at most (the last iterates and some spread
            along the path).
        max_seconds: wall-clock limit of the whole search.

    References: Zhang, Carpenter, Gelman & Vehtari, "Pathfinder: Parallel quasi-Newton
    variational inference" (JMLR 2022).

    Example:
        >>> import nfcore
        >>> t = nfcore.targets.from_expression(2, "-0.5*sum(((z - m)/s)**2)",
        ...                                    {"m": [1000.0, -3.0], "s": [0.01, 20.0]})
        >>> start = pathfinder(t)
        >>> sd = (start.factor @ start.factor.T).diag().sqrt()
        >>> [round(float(v), 3) for v in start.mean], [round(float(v), 3) for v in sd]
        ([1000.0, -3.0], [0.01, 20.0])
    """
    began = time.monotonic()
    deadline = began + max_seconds
    dim = target.dim
    log_p = _log_density(target)
    g = torch.Generator().manual_seed(seed)
    x0 = _start_point(log_p, dim, g)
    if x0 is None:
        return None
    path, values = _lbfgs_path(log_p, x0, max_iterations, deadline)
    eps = torch.randn(draws, dim, generator=g, dtype=torch.float64)
    base_log = -0.5 * (eps * eps).sum(-1) - 0.5 * dim * _LOG_2PI

    def score(mean: Tensor, factor: Tensor, logdet: float) -> tuple[float, float, float]:
        """(a lower confidence bound on log Z, the importance estimate of log Z, the ELBO), from
        the same draws for every candidate."""
        with torch.no_grad():
            log_w = log_p(mean + eps @ factor.T) - (base_log - logdet)
        log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, -math.inf), log_w)
        if not bool(torch.isfinite(log_w).any()):
            return -math.inf, -math.inf, -math.inf
        lse = torch.logsumexp(log_w, 0)
        ess = float(torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, 0)))
        log_z = float(lse) - math.log(draws)
        # The estimate's relative standard error is about sqrt(1/ESS - 1/n): two of them off.
        bound = log_z - 2.0 * math.sqrt(max(1.0 / ess - 1.0 / draws, 0.0))
        return bound, log_z, float(log_w.mean())

    eye = torch.eye(dim, dtype=torch.float64)
    zero = torch.zeros(dim, dtype=torch.float64)
    candidates = [(score(zero, eye, 0.0), zero, eye, -1)]
    n = len(path)
    picks = list(range(n - 1, max(n - 1 - max_candidates // 2, -1), -1))
    spread = torch.linspace(0, n - 1, max_candidates - len(picks)).round().long().tolist()
    order = picks + [i for i in dict.fromkeys(spread) if i not in picks]
    tried = 0
    for i in order:
        if time.monotonic() > deadline and tried:
            break
        tried += 1
        laplace = _laplace(log_p, path[i])
        if laplace is None:
            continue
        mean, factor, logdet = laplace
        candidates.append((score(mean, factor, logdet), mean, factor, i))
    # Refine the best so far by Gaussian VI (see ``_refine``), a candidate like the others.
    leader = max(_eligible(candidates, dim), key=lambda c: c[0][0])
    (_, lead_log_z, lead_elbo), *_ = leader
    # log Z - ELBO estimates KL(leader || target): near zero, the leader is the target already
    # (a Gaussian posterior's Laplace approximation) and there is nothing to refine.
    if (math.isfinite(leader[0][0]) and lead_log_z - lead_elbo > EXACT_KL
            and time.monotonic() < deadline):
        _, lead_mean, lead_factor, lead_index = leader
        logdet = 0.0 if lead_index < 0 else float(torch.linalg.slogdet(lead_factor)[1])
        try:
            refined = _refine(log_p, lead_mean, lead_factor, logdet, g, deadline)
        except (RuntimeError, ValueError, FloatingPointError):  # as the L-BFGS path: no candidate
            refined = None
        if refined is not None:
            mean, factor, logdet = refined
            candidates.append((score(mean, factor, logdet), mean, factor, _REFINED))
    best, best_mean, best_factor, chosen = max(_eligible(candidates, dim), key=lambda c: c[0][0])
    finite_values = [v for v in values if math.isfinite(v)]
    info = {"method": "pathfinder", "iterations": n - 1, "candidates": tried,
            "chosen": ("N(0, I)" if chosen == -1 else
                       f"Gaussian VI from {_describe(leader[3], n)}" if chosen == _REFINED else
                       _describe(chosen, n)),
            "log_z": best[1] if math.isfinite(best[1]) else None,
            "log_z_bound": best[0] if math.isfinite(best[0]) else None,
            "elbo": best[2] if math.isfinite(best[2]) else None}
    # Other modes, for the diagnostics: further paths from other points, in up to half the time
    # left.
    now = time.monotonic()
    modes = other_modes(log_p, dim, g, best_mean, best_factor, now + 0.5 * max(deadline - now, 0.0),
                        max_iterations, log_z=best[1])
    info["other_modes"] = len(modes)
    info["seconds"] = round(time.monotonic() - began, 3)
    return GaussianStart(mean=best_mean, factor=best_factor, elbo=best[2],
                         mode_log_prob=max(finite_values) if finite_values else None,
                         info={**info, "identity": chosen == -1}, modes=modes)


#: How many further L-BFGS paths ``other_modes`` runs.
EXTRA_PATHS = 3
#: How far apart (in sds, under both Gaussians' covariances) two modes must be to count as two.
MODE_SEPARATION = 6.0
#: The least share of the mass, by its Laplace estimate, that another mode must hold to count.
MIN_MODE_MASS = 1e-3


def _apart(mean: Tensor, factor: Tensor, other_mean: Tensor, other_factor: Tensor) -> bool:
    gap = mean - other_mean
    return all(float(torch.linalg.solve(f, gap).norm()) > MODE_SEPARATION
               for f in (factor, other_factor))


def other_modes(log_p: Callable[[Tensor], Tensor], dim: int, g: torch.Generator, mean: Tensor,
                factor: Tensor, deadline: float, max_iterations: int = 1000,
                log_z: float | None = None) -> list[tuple[Tensor, Tensor]]:
    """Laplace approximations ``(mean, factor)`` at the ends of ``EXTRA_PATHS`` further L-BFGS
    paths from Stan-style uniform(-2, 2) points, kept where they are ``MODE_SEPARATION`` sds apart
    from ``N(mean, factor factor^T)`` and from each other: modes the start (and so the fit) may
    not have seen. A mixture whose components swap labels has its copies 50 sds apart, and
    reverse KL fits one; ``missing_mass``'s proposal then also goes to the others.

    With ``log_z`` (the start's estimate of ``log Z``), an end whose Laplace estimate of its own
    mass, ``log p~(m) + log|det factor| + dim/2 log(2 pi)``, is below ``MIN_MODE_MASS`` of it is
    not kept: a centred hierarchical model's density grows without bound down its funnel's neck,
    where paths end (a group scale of e^-18 on eight schools) on almost no mass."""
    known = [(mean, factor)]
    found: list[tuple[Tensor, Tensor]] = []
    for _ in range(EXTRA_PATHS):
        if time.monotonic() > deadline:
            break
        x0 = 4.0 * torch.rand(dim, generator=g, dtype=torch.float64) - 2.0
        with torch.no_grad():
            if not bool(torch.isfinite(log_p(x0[None])).all()):
                continue
        path, _ = _lbfgs_path(log_p, x0, max_iterations, deadline)
        laplace = _laplace(log_p, path[-1]) if len(path) > 1 else None
        if laplace is None:
            continue
        m, f, logdet = laplace
        if log_z is not None and math.isfinite(log_z):
            with torch.no_grad():
                mass = float(log_p(m[None])[0]) + logdet + 0.5 * dim * _LOG_2PI
            if not mass > log_z + math.log(MIN_MODE_MASS):
                continue
        if all(_apart(m, f, km, kf) for km, kf in known):
            known.append((m, f))
            found.append((m, f))
    return found


def gaussian_samples(start: GaussianStart, n: int, seed: int = 0) -> Tensor:
    """``n`` points (float64) whose sample mean and covariance are exactly the start's: pseudo-data
    for ``Flow.initialize``."""
    dim = start.mean.shape[0]
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(max(n, 2 * dim + 2), dim, generator=g, dtype=torch.float64)
    eps = eps - eps.mean(0)
    chol = torch.linalg.cholesky(eps.T @ eps / (eps.shape[0] - 1))
    white = torch.linalg.solve_triangular(chol, eps.T, upper=False).T  # covariance exactly I
    return start.mean + white @ start.factor.T

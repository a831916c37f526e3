"""The lean inference path (row blocks, cached masked weights, the lean spline kernel) gives the
eager path's values: every preset, plain and conditional, ``log_prob`` and ``sample_and_log_prob``.
"""

import pytest
import torch

import nfcore
from nfcore.spec import CONDITIONAL, LAYER_TYPES, PRESETS

#: Presets whose repeated layer takes a context.
CONDITIONAL_PRESETS = sorted(p for p, (kind, *_) in PRESETS.items() if kind in CONDITIONAL)
CASES = [(p, 0) for p in sorted(PRESETS)] + [(p, 3) for p in CONDITIONAL_PRESETS]
ROWS = 300  # several blocks of BLOCK rows, the last one ragged
BLOCK = 64


def _flow(preset: str, context_dim: int, dtype: str) -> nfcore.Flow:
    torch.manual_seed(0)
    spec = {"preset": preset, "dim": 4, "context_dim": context_dim, "dtype": dtype}
    kind = PRESETS[preset][0]
    # planar and radial have a network (and so "hidden") only when conditional
    if "hidden" in LAYER_TYPES[kind] and (context_dim or kind not in ("planar", "radial")):
        spec["hidden"] = [16, 16]
    if preset != "cnf":
        spec["transforms"] = 2
    flow = nfcore.build(spec)
    # Random weights everywhere (conditioners start at the identity, which would hide a wrong
    # spline or a stale cached weight).
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow.block_rows = BLOCK
    return flow


def _inputs(flow: nfcore.Flow):
    gen = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(ROWS, flow.dim, generator=gen, dtype=flow.dtype)
    x[:10] *= 5.0  # some rows beyond the splines' interval: the identity tails
    ctx = (torch.randn(ROWS, flow.context_dim, generator=gen, dtype=flow.dtype)
           if flow.context_dim else None)
    return x, ctx


def _both(flow: nfcore.Flow, fn):
    with torch.inference_mode():
        flow.fast_inference = False
        eager = fn()
        flow.fast_inference = True
        fast = fn()
    return eager, fast


def _close(a: torch.Tensor, b: torch.Tensor, dtype: str) -> None:
    tol = 1e-4 if dtype == "float32" else 1e-10
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("preset", "context_dim"), CASES)
def test_log_prob_matches_eager(preset, context_dim, dtype):
    flow = _flow(preset, context_dim, dtype)
    x, ctx = _inputs(flow)
    eager, fast = _both(flow, lambda: flow.log_prob(x, ctx))
    _close(eager, fast, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("preset", "context_dim"), CASES)
def test_sample_and_log_prob_matches_eager(preset, context_dim, dtype):
    flow = _flow(preset, context_dim, dtype)
    _, ctx = _inputs(flow)

    def draw():
        return flow.sample_and_log_prob(ROWS, context=ctx,
                                        generator=torch.Generator().manual_seed(2))

    (xe, lqe), (xf, lqf) = _both(flow, draw)
    _close(xe, xf, dtype)
    _close(lqe, lqf, dtype)


def test_the_lean_path_is_taken_and_blocks_are_row_wise():
    """The lean spline differs from the eager one in float rounding only, so the two paths'
    values are close but not all bitwise equal; and a row's value does not depend on its block."""
    flow = _flow("nsf", 0, "float32")
    x, _ = _inputs(flow)
    eager, fast = _both(flow, lambda: flow.log_prob(x))
    assert not torch.equal(eager, fast)  # the lean kernels did run
    with torch.inference_mode():
        whole = flow.log_prob(x)
        flow.block_rows = 7
        torch.testing.assert_close(flow.log_prob(x), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["maf", "nsf_ar"])
def test_cached_masked_weights_follow_updates(preset):
    """A weight changed in place (an optimizer step, a load) is seen by the next lean pass (for
    nsf_ar: the cached augmented, reordered weights of ``MADE.planes``)."""
    flow = _flow(preset, 0, "float64")
    x, _ = _inputs(flow)
    with torch.no_grad():
        before = flow.log_prob(x)
        for p in flow.parameters():
            p.mul_(1.1)
        after = flow.log_prob(x)
        flow.fast_inference = False
        reference = flow.log_prob(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("preset", "context_dim"), CASES)
def test_warm_up_runs_for_every_preset(preset, context_dim):
    flow = _flow(preset, context_dim, "float32")
    assert flow.warm_up(rows=8) is flow


def test_warm_up_fills_the_masked_weight_cache():
    """After ``warm_up`` (what the server calls at model load) the MADE layers hold their masked
    weights, so a client's first request computes none."""
    from nfcore.layers.base import MaskedLinear

    flow = _flow("maf", 0, "float32")
    masked = [m for m in flow.modules() if isinstance(m, MaskedLinear)]
    assert masked and all("_masked" not in m.__dict__ for m in masked)
    flow.warm_up(rows=8)
    assert all("_masked" in m.__dict__ for m in masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
def test_planar_spline_matches_eager(dtype, inverse):
    """``RationalQuadratic.planar`` (parameter planes, as ``MADE.planes`` lays them out) gives the
    eager kernel's values in both directions, the identity tails included; the inverse direction
    is not reached through a preset's log_prob, so it is checked here."""
    from nfcore.layers.base import eager_inference
    from nfcore.layers.elementwise import RationalQuadratic

    gen = torch.Generator().manual_seed(3)
    rq = RationalQuadratic(bins=6, bound=3.0)
    n, f = 257, 3
    params = 2.0 * torch.randn(n, f, rq.params, generator=gen, dtype=dtype)
    v = 2.0 * torch.randn(n, f, generator=gen, dtype=dtype)
    v[:7] *= 4.0  # beyond the bound
    v[7, 0], v[8, 1] = 3.0, -3.0  # on it
    order, (before, after) = rq.planar_layout
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert sorted(order) == list(range(rq.params))
    with torch.inference_mode():
        with eager_inference():
            ref_out, ref_ladj = rq(v, params, inverse)
        body = params.permute(2, 1, 0)[list(order)].reshape(len(order), f * n)
        planes = torch.cat([torch.full((before, f * n), float("nan"), dtype=dtype), body,
                            torch.full((after, f * n), float("nan"), dtype=dtype)])
        # three groups of one feature each: (G, planes, N), the elements in the same order
        grouped = planes.view(len(planes), f, n).transpose(0, 1).contiguous()
        out, ladj = rq.planar(v.T.reshape(-1), planes[None], inverse)  # (overwrites planes)
        out3, ladj3 = rq.planar(v.T.reshape(-1), grouped, inverse)
    torch.testing.assert_close(out3, out, rtol=tol, atol=tol)  # (vector and scalar exp loops
    torch.testing.assert_close(ladj3, ladj, rtol=tol, atol=tol)  # may round apart)
    torch.testing.assert_close(out.view(f, n).T, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(ladj.view(f, n).T, ref_ladj, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", ["relu", "elu"])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_made_planes_match_forward(activation, context_dim):
    """``MADE.planes`` (the network run transposed, biases folded into the weights, output rows
    reordered, padding planes) holds ``MADE.forward``'s values, for an in-place activation and one
    that is not, with and without a context."""
    from nfcore.layers.base import MADE

    torch.manual_seed(4)
    made = MADE(4, 5, [16, 16], activation, context_dim).double()
    with torch.no_grad():
        for p in made.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(33, 4, dtype=torch.float64)
    ctx = torch.randn(33, context_dim, dtype=torch.float64) if context_dim else None
    order = (3, 0, 4, 2, 1)
    assert made.plane_groups() == 4 and made.plane_groups(limit=3) == 2
    with torch.inference_mode():
        ref = made(x, ctx).permute(2, 1, 0)[list(order)]  # (P, F, N), params in order
        for groups in (1, 2, 4):
            planes, xt = made.planes(x, ctx, order, (2, 1), groups)
            assert planes.shape == (groups, 2 + 5 + 1, 4 // groups, 33)
            assert planes.is_contiguous()
            body = planes[:, 2:7].transpose(0, 1).reshape(5, 4, 33)
            torch.testing.assert_close(body, ref)
            torch.testing.assert_close(xt, x.T)


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_planar_path_on_tiny_batches(rows):
    """nsf_ar's planar lean path on an empty batch and on one or two rows (shapes that an
    inferred ``-1`` in a view cannot take), and on a dim with no divisor but 1 and itself."""
    torch.manual_seed(5)
    flow = nfcore.build({"preset": "nsf_ar", "dim": 7, "hidden": [8], "transforms": 2})
    x = torch.randn(rows, 7)
    eager, fast = _both(flow, lambda: flow.log_prob(x))
    assert fast.shape == (rows,)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)

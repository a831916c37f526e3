"""Properties every flow must have, parametrised over every layer type and every preset (float64)."""

import json
import math

import pytest
import torch
from torch.autograd.functional import jacobian

import nfcore
from tests.nfcore.conftest import (
    CASES,
    CNF_TOLERANCE,
    CONDITIONAL_TYPES,
    PRESETS,
    SOLVED,
    make_flow,
    perturb,
    tolerance,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(n: int, dim: int, seed: int = 1, scale: float = 1.5) -> torch.Tensor:
    return scale * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)


@pytest.mark.parametrize("case", CASES)
def test_log_prob_shape_and_finiteness(case):
    flow = make_flow(case)
    lp = flow.log_prob(_points(7, 3))
    assert lp.shape == (7,)
    assert lp.dtype == torch.float64
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("case", CASES)
def test_inverse_undoes_forward_both_ways(case):
    flow = make_flow(case)
    x = _points(64, 3)
    with torch.no_grad():
        z, ladj = flow.transform(x)
        x_back, log_q = flow.sample_from_noise(z)
        # A sequential (autoregressive) inverse carries each feature's float64 round-off through
        # the conditioner into the next: allow 1e-6 relative on top of the case's absolute.
        assert torch.allclose(x_back, x, atol=tolerance(case), rtol=1e-6)
        # and the other way: latent -> data -> latent
        x2, _ = flow.sample_from_noise(x)
        z2, _ = flow.transform(x2)
        assert torch.allclose(z2, x, atol=tolerance(case), rtol=0)
        # the two directions' log-dets agree: log q(x) = log N(z) + ladj
        assert torch.allclose(log_q, flow.base_log_prob(z) + ladj, atol=tolerance(case),
                              rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_log_det_matches_autograd_jacobian(case):
    flow = make_flow(case)
    for x in _points(4, 3, seed=2):
        def fwd(v):
            return flow.transform(v[None])[0][0]

        def inv(v):
            return flow.sample_from_noise(v[None])[0][0]

        _, ladj = flow.transform(x[None])
        expected = torch.linalg.slogdet(jacobian(fwd, x))[1]
        assert abs(ladj.item() - expected.item()) < tolerance(case), (ladj.item(), expected.item())

        z = x
        x_of_z, log_q = flow.sample_from_noise(z[None])
        ladj_inv = flow.base_log_prob(z[None]) - log_q  # log|det dx/dz|
        expected_inv = torch.linalg.slogdet(jacobian(inv, z))[1]
        assert abs(ladj_inv.item() - expected_inv.item()) < tolerance(case)


@pytest.mark.parametrize("case", CASES)
def test_sample_and_log_prob_agrees_with_log_prob(case):
    flow = make_flow(case)
    x, log_q = flow.sample_and_log_prob(200, generator=torch.Generator().manual_seed(3))
    assert x.shape == (200, 3) and log_q.shape == (200,)
    assert torch.allclose(flow.log_prob(x), log_q, atol=tolerance(case), rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_seeded_sampling_is_reproducible(case):
    flow = make_flow(case)
    a = flow.sample(5, generator=torch.Generator().manual_seed(9))
    b = flow.sample(5, generator=torch.Generator().manual_seed(9))
    c = flow.sample(5, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


FIXED_LAYERS = ["layer:permute", "layer:standardize", "layer:asinh"]


@pytest.mark.parametrize("case", [c for c in CASES if c not in FIXED_LAYERS])
def test_gradients_reach_every_parameter(case):
    flow = make_flow(case).train()
    x = _points(32, 3)
    loss = -flow.log_prob(x).mean()
    y, log_q = flow.sample_and_log_prob(32, generator=torch.Generator().manual_seed(4))
    loss = loss + (log_q + (y * y).sum(-1)).mean()
    loss.backward()
    params = dict(flow.named_parameters())
    assert params, "a flow of this kind should have trainable parameters"
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("case", FIXED_LAYERS)
def test_fixed_layers_have_no_trainable_parameters(case):
    assert list(make_flow(case).parameters()) == []


@pytest.mark.parametrize("case", CASES)
def test_random_2d_flow_integrates_to_one(case):
    # A gentler perturbation than elsewhere: stacked random affine layers otherwise put mass at
    # |x| ~ 1e4, which no grid resolves; the property itself is tested on non-trivial flows.
    # Flows that solve numerically get a coarser grid, and a CNF a looser tolerance, for speed:
    # at this scale their densities are smooth and close to the base, which 251 points resolve.
    solved = any(kind in case for kind in SOLVED)
    flow = make_flow(case, dim=2, seed=5, scale=0.1,
                     **({"ode": {"rtol": 1e-6, "atol": 1e-7}} if "cnf" in case else {}))
    lim, n = (10.0, 251) if solved else (12.0, 801)
    t = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    with torch.no_grad():
        p = flow.log_prob(grid).exp().reshape(n, n)
    h = (2 * lim) / (n - 1)
    total = torch.trapezoid(torch.trapezoid(p, dx=h, dim=1), dx=h).item()
    assert abs(total - 1.0) < 1e-2, total


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip_is_exact(case, tmp_path):
    flow = make_flow(case)
    path = tmp_path / "m" / "model.safetensors"
    digest = nfcore.save(flow, path, metadata={"training": {"steps": 3}})
    assert digest.startswith("sha256:")
    loaded = nfcore.load(path)
    x = _points(16, 3)
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
    assert torch.equal(loaded.sample(8, generator=g1), flow.sample(8, generator=g2))
    assert loaded.spec == flow.spec
    assert loaded.metadata["training"] == '{"steps": 3}'
    assert not list(path.parent.glob("*.tmp")), "atomic write left a temporary file"


@pytest.mark.parametrize("kind", CONDITIONAL_TYPES + ["nsf", "maf", "realnvp", "iaf", "nsf_ar"])
def test_context_changes_the_output(kind):
    if kind in PRESETS and kind not in CONDITIONAL_TYPES:
        spec = {"preset": kind, "dim": 3, "context_dim": 2, "dtype": "float64",
                "transforms": 2, "hidden": [16]}
    else:
        layer = {"type": kind, "hidden": [16], **(CNF_TOLERANCE if kind == "cnf" else {})}
        spec = {"dim": 3, "context_dim": 2, "dtype": "float64", "layers": [layer]}
    flow = nfcore.build(spec)
    if kind == "cnf":  # a CNF starts as the identity, whatever the context
        perturb(flow)
    x = _points(10, 3)
    c1, c2 = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    lp1, lp2 = flow.log_prob(x, context=c1), flow.log_prob(x, context=c2)
    assert not torch.allclose(lp1, lp2)
    s1 = flow.sample(4, context=c1, generator=torch.Generator().manual_seed(0))
    s2 = flow.sample(4, context=c2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(s1, s2)
    # conditional sampling and scoring agree, with a per-row context too
    ctx = torch.randn(6, 2, dtype=torch.float64)
    xs, log_q = flow.sample_and_log_prob(6, context=ctx)
    assert torch.allclose(flow.log_prob(xs, context=ctx), log_q, atol=tolerance(kind))


def test_conditional_flow_is_normalized_for_each_context():
    flow = nfcore.build({"preset": "nsf", "dim": 2, "context_dim": 1, "dtype": "float64",
                         "transforms": 2, "hidden": [16]})
    t = torch.linspace(-10, 10, 501, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    h = 20 / 500
    for c in (-2.0, 0.0, 3.0):
        with torch.no_grad():
            p = flow.log_prob(grid, context=torch.tensor([c], dtype=torch.float64)).exp()
        total = torch.trapezoid(torch.trapezoid(p.reshape(501, 501), dx=h, dim=1), dx=h).item()
        assert abs(total - 1.0) < 1e-2


@pytest.mark.parametrize("case", ["preset:nsf", "preset:maf", "preset:planar", "layer:radial"])
def test_float32_flows_work(case):
    flow = make_flow(case, dtype="float32", scale=0.1)
    x, log_q = flow.sample_and_log_prob(100)
    assert x.dtype == torch.float32 and log_q.dtype == torch.float32
    assert torch.allclose(flow.log_prob(x), log_q, atol=1e-3)


def test_planar_flow_scores_data_it_did_not_generate():
    torch.manual_seed(0)
    flow = nfcore.build({"preset": "planar", "dim": 2, "transforms": 8, "dtype": "float64"})
    data = torch.tensor([[0.3, -4.0], [50.0, 2.0], [-1e4, 1e4]], dtype=torch.float64)
    z, _ = flow.transform(data)
    x_back, _ = flow.sample_from_noise(z)
    assert torch.allclose(x_back, data, atol=1e-8, rtol=1e-12)


def test_planar_keeps_invertibility_constraint_under_any_parameters():
    from nfcore.layers import Planar

    layer = Planar(3).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.u.copy_(-10.0 * layer.w)  # w.u far below -1
        u_hat, k = layer._u_hat()
    assert k.item() > -1.0


def test_radial_keeps_beta_at_least_minus_alpha():
    from nfcore.layers import Radial

    layer = Radial(2).double()
    with torch.no_grad():
        layer.beta_raw.fill_(-50.0)
        alpha, beta = layer._alpha_beta()
    assert beta.item() >= -alpha.item()


def test_conditional_planar_and_radial_keep_their_constraints_for_every_context():
    from nfcore.layers import Planar, Radial

    planar, radial = Planar(3, context_dim=2).double(), Radial(3, context_dim=2).double()
    with torch.no_grad():
        for net in (planar.context, radial.context):
            net[-1].weight.mul_(1000.0)  # let the context push the raw parameters anywhere
    ctx = 100.0 * _context(256)
    with torch.no_grad():
        u_hat, k = planar._u_hat(ctx)
        alpha, beta = radial._alpha_beta(ctx)
    assert k.shape == (256,) and (k > -1.0).all()
    assert k.min() < 0 < k.max()  # the context reaches both sides of the constraint
    assert alpha.shape == beta.shape == (256,) and (alpha > 0).all() and (beta >= -alpha).all()
    assert (beta < 0).any() and (beta > 0).any()


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_amortized_layers_take_a_linear_context_map(kind):
    flow = nfcore.build({"dim": 3, "context_dim": 4, "dtype": "float64",
                         "layers": [{"type": kind, "hidden": []}] * 2})
    assert flow.spec["layers"][0] == {"type": kind, "hidden": [], "activation": "relu"}
    assert sum(p.numel() for p in flow.layers[0].context.parameters()) == (
        5 * (2 * 3 + 1 if kind == "planar" else 3 + 2))
    x, log_q = flow.sample_and_log_prob(8, context=torch.ones(4, dtype=torch.float64))
    assert torch.allclose(flow.log_prob(x, context=torch.ones(4, dtype=torch.float64)), log_q,
                          atol=1e-8)


def test_standardize_makes_log_prob_in_data_units():
    flow = nfcore.build({"dim": 2, "dtype": "float64",
                         "layers": [{"type": "standardize"}]})
    data = torch.randn(10_000, 2, dtype=torch.float64) * torch.tensor([3.0, 0.5]) + 7.0
    flow.initialize(data)
    x = torch.tensor([[7.0, 7.0]], dtype=torch.float64)
    sd = data.std(0)
    expected = -math.log(2 * math.pi) - torch.log(sd).sum() - 0.5 * (
        ((x - data.mean(0)) / sd) ** 2).sum()
    assert torch.allclose(flow.log_prob(x)[0], expected)


def test_spline_is_identity_outside_its_bound():
    flow = nfcore.build({"dim": 2, "dtype": "float64",
                         "layers": [{"type": "nsf_coupling", "bound": 3.0, "hidden": [8]}]})
    x = torch.tensor([[0.1, 3.5], [0.1, -7.0], [100.0, -3.01]], dtype=torch.float64)
    z, ladj = flow.transform(x)
    assert torch.equal(z, x)
    assert torch.equal(ladj, torch.zeros(3, dtype=torch.float64))


def test_lu_linear_starts_as_its_permutation():
    x = _points(5, 3)
    reverse = nfcore.build({"dim": 3, "dtype": "float64",
                            "layers": [{"type": "lu_linear", "permutation": "reverse"}]})
    z, ladj = reverse.transform(x)
    assert torch.equal(z, x.flip(-1)) and torch.equal(ladj, torch.zeros(5, dtype=torch.float64))
    orders = set()
    for seed in range(20):
        torch.manual_seed(seed)
        flow = nfcore.build({"dim": 3, "dtype": "float64", "layers": [{"type": "lu_linear"}]})
        z, _ = flow.transform(x)
        order = tuple(int((x == z[:, [j]]).all(0).nonzero()) for j in range(3))
        orders.add(order)
    assert len(orders) > 2  # "random" (the default) draws different orders


def test_fast_paths_are_declared():
    maf = nfcore.build({"preset": "maf", "dim": 3})
    iaf = nfcore.build({"preset": "iaf", "dim": 3})
    nsf = nfcore.build({"preset": "nsf", "dim": 3})
    assert maf.fast_log_prob and not maf.fast_sample
    assert iaf.fast_sample and not iaf.fast_log_prob
    assert nsf.fast_sample and nsf.fast_log_prob


@pytest.mark.parametrize("lean", [False, True])
def test_spline_with_zero_parameters_is_exactly_the_identity(lean):
    """Zero raw parameters give even bins and unit slopes at every knot, so the identity to
    rounding, on both kernels (the inner-knot slopes were 1 + min_derivative, which moved a
    zeroed NSF layer's log-density by about 1e-3 per feature)."""
    from nfcore.layers.elementwise import RationalQuadratic

    rq = RationalQuadratic(8, 3.0)
    v = torch.linspace(-2.9, 2.9, 59, dtype=torch.float64).reshape(-1, 1)
    params = torch.zeros(v.shape[0], 1, rq.params, dtype=torch.float64)
    for inverse in (False, True):
        with torch.no_grad() if lean else torch.enable_grad():
            out, ladj = rq(v, params, inverse)
        torch.testing.assert_close(out, v, rtol=0, atol=1e-12)
        torch.testing.assert_close(ladj, torch.zeros_like(ladj), rtol=0, atol=1e-12)


def _spline_on(column: torch.Tensor, bins: int = 8, bound: float = 5.0):
    """The element-wise spline whose knots ``marginal_params`` sets from ``column`` (N, 1)."""
    from nfcore.layers.elementwise import RationalQuadratic

    rq = RationalQuadratic(bins, bound)
    params = rq.marginal_params(column)
    assert params.shape == (1, 3 * bins - 1) and torch.isfinite(params).all()
    return lambda v, inverse=False: rq(v, params.expand(v.shape[0], 1, -1), inverse)


def test_knots_set_from_standard_normal_data_give_nearly_the_identity():
    spline = _spline_on(_points(20_000, 1, seed=3, scale=1.0))
    grid = torch.linspace(-2.5, 2.5, 51, dtype=torch.float64)[:, None]
    z, ladj = spline(grid)
    assert (z - grid).abs().max() < 0.1
    assert ladj.abs().max() < 0.2


@pytest.mark.parametrize("shape", ["two_clusters", "skewed"])
def test_knots_set_from_data_map_its_marginal_close_to_a_standard_normal(shape):
    g = torch.Generator().manual_seed(4)
    if shape == "two_clusters":  # two narrow modes with a gap between them
        column = 0.05 * torch.randn(20_000, 1, generator=g, dtype=torch.float64)
        column[::2] -= 1.0
        column[1::2] += 1.0
    else:
        column = 0.3 * torch.empty(20_000, 1, dtype=torch.float64).exponential_(generator=g)
    spline = _spline_on(column)
    z, _ = spline(column)
    quartiles = torch.quantile(z[:, 0], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert quartiles[1].abs() < 0.1
    assert 0.5 < quartiles[2] - quartiles[0] < 2.5  # a standard normal's: 1.35; the data's: < 0.5
    assert 0.8 < z.std() < 1.25
    back, _ = spline(z, inverse=True)
    assert torch.allclose(back, column, atol=1e-9)


def test_knots_from_a_constant_column_are_finite():
    spline = _spline_on(torch.full((100, 1), 0.25, dtype=torch.float64))
    z, ladj = spline(torch.linspace(-6, 6, 25, dtype=torch.float64)[:, None])
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("preset", ["nsf_ar", "nsf"])
def test_initialize_sets_spline_knots_from_the_data_only_when_asked(preset):
    g = torch.Generator().manual_seed(5)
    data = 0.05 * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    data[::2] += torch.tensor([1.0, 1.0], dtype=torch.float64)
    data[1::2] -= torch.tensor([1.0, 1.0], dtype=torch.float64)
    spec = {"preset": preset, "dim": 2, "transforms": 3, "hidden": [16], "dtype": "float64"}
    flows = {}
    for knots in (False, True):
        torch.manual_seed(0)
        flows[knots] = nfcore.build(spec).initialize(data, knots=knots)
    plain, knotted = (flows[k].state_dict() for k in (False, True))
    changed = {k for k in plain if not torch.equal(plain[k], knotted[k])}
    # Only the output layer of each of the three spline layers' conditioners (hidden [16]:
    # net.2): its bias holds the knots, its weights are zeroed (the same spline for every row).
    assert len(changed) == 6 and all(k.endswith(("net.2.bias", "net.2.weight")) for k in changed)
    assert all(not knotted[k].any() for k in changed if k.endswith("weight"))
    flow = flows[True]
    with torch.no_grad():
        gain = (flow.log_prob(data) - flows[False].log_prob(data)).mean()
        x = data[:64]
        z, ladj = flow.transform(x)
        back, log_q = flow.sample_from_noise(z)
    assert gain > 0.2  # nats per point, before any training (0 without the knots)
    assert torch.allclose(back, x, atol=1e-8, rtol=0)
    assert torch.allclose(log_q, flow.base_log_prob(z) + ladj, atol=1e-8, rtol=0)
    for point in x[:3]:
        expected = torch.linalg.slogdet(jacobian(lambda v: flow.transform(v[None])[0][0], point))[1]
        assert abs(flow.transform(point[None])[1].item() - expected.item()) < 1e-6


@pytest.mark.parametrize("preset", ["nsf", "nsf_ar"])
def test_a_spline_flow_initialized_on_gaussian_data_is_that_gaussian(preset):
    # Before any training, a spline flow's start is its data's own Gaussian (loc_scale) with each
    # spline the map of its input's marginal, which here is a standard normal: no random bend. A
    # random conditioner start scored such rows 0.6 nats below the Gaussian in 5-D.
    g = torch.Generator().manual_seed(8)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64) / 2 + torch.eye(5, dtype=torch.float64)
    data, fresh = (torch.randn(n, 5, generator=g, dtype=torch.float64) @ mix * 3 + 5
                   for n in (20_000, 5000))
    exact = torch.distributions.MultivariateNormal(5 + torch.zeros(5, dtype=torch.float64),
                                                   9 * mix.T @ mix)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": preset, "dim": 5, "dtype": "float64"}).initialize(data)
    with torch.no_grad():
        gap = (exact.log_prob(fresh) - flow.log_prob(fresh)).mean()
    assert abs(gap) < 0.02, gap


# ---------------------------------------------------------------- the new families, conditional
#: Every layer and preset of the residual, Sylvester and continuous-time families.
NEW_CASES = ["layer:residual", "layer:sylvester", "layer:cnf", "preset:resflow",
             "preset:sylvester", "preset:cnf"]
#: Planar and radial flows whose parameters come from the context (Rezende & Mohamed §6.2).
AMORTIZED_CASES = ["layer:planar", "layer:radial", "preset:planar", "preset:radial"]


def _context(n: int, seed: int = 6) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("case", NEW_CASES + AMORTIZED_CASES)
def test_conditional_inverse_log_det_and_sampling_agree(case):
    flow = make_flow(case, context_dim=2)
    tol = tolerance(case)
    x, ctx = _points(32, 3), _context(32)
    with torch.no_grad():
        z, ladj = flow.transform(x, ctx)
        x_back, log_q = flow.sample_from_noise(z, ctx)
    assert torch.allclose(x_back, x, atol=tol, rtol=0)
    assert torch.allclose(log_q, flow.base_log_prob(z) + ladj, atol=tol, rtol=0)
    for point, c in zip(x[:2], ctx[:2], strict=True):
        expected = torch.linalg.slogdet(
            jacobian(lambda v, c=c: flow.transform(v[None], c[None])[0][0], point))[1]
        assert abs(flow.transform(point[None], c[None])[1].item() - expected.item()) < tol
    xs, log_q = flow.sample_and_log_prob(16, context=ctx[:16],
                                         generator=torch.Generator().manual_seed(1))
    assert torch.allclose(flow.log_prob(xs, context=ctx[:16]), log_q, atol=tol, rtol=0)


@pytest.mark.parametrize("case", NEW_CASES + AMORTIZED_CASES)
def test_conditional_2d_density_integrates_to_one(case):
    flow = make_flow(case, dim=2, context_dim=2, seed=5, scale=0.1,
                     **({"ode": {"rtol": 1e-6, "atol": 1e-7}} if "cnf" in case else {}))
    lim, n = 10.0, 151 if "cnf" in case else 201
    t = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    with torch.no_grad():
        p = flow.log_prob(grid, context=torch.tensor([0.7, -1.2], dtype=torch.float64)).exp()
    h = (2 * lim) / (n - 1)
    total = torch.trapezoid(torch.trapezoid(p.reshape(n, n), dx=h, dim=1), dx=h).item()
    assert abs(total - 1.0) < 1e-2, total


@pytest.mark.parametrize("case", NEW_CASES + AMORTIZED_CASES)
@pytest.mark.parametrize("context_dim", [0, 2])
def test_new_families_round_trip_through_safetensors_and_reject_truncation(case, context_dim,
                                                                           tmp_path):
    flow = make_flow(case, context_dim=context_dim)
    ctx = _context(8) if context_dim else None
    path = tmp_path / "model.safetensors"
    nfcore.save(flow, path)
    loaded = nfcore.load(path)
    x = _points(8, 3)
    assert torch.equal(loaded.log_prob(x, context=ctx), flow.log_prob(x, context=ctx))
    g1, g2 = (torch.Generator().manual_seed(2) for _ in range(2))
    assert torch.equal(loaded.sample(8, context=ctx, generator=g1),
                       flow.sample(8, context=ctx, generator=g2))
    meta = nfcore.read_metadata(path)
    assert json.loads(meta["nfcore.cost"]) == flow.cost
    assert json.loads(meta["nfcore.log_prob_exact"]) is True
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 8):
        with pytest.raises(nfcore.ArtifactError):
            nfcore.loads(data[:cut])


@pytest.mark.parametrize(("preset", "cost"), [
    ("resflow", {"log_prob": "one pass", "sample": "iterative"}),
    ("sylvester", {"log_prob": "iterative", "sample": "one pass"}),
    ("cnf", {"log_prob": "ode", "sample": "ode"}),
    ("nsf", {"log_prob": "one pass", "sample": "one pass"}),
    ("maf", {"log_prob": "one pass", "sample": "iterative"}),
    ("planar", {"log_prob": "iterative", "sample": "one pass"})])
def test_cost_names_the_most_expensive_layer(preset, cost):
    assert nfcore.build({"preset": preset, "dim": 3, "hidden": [8]} if preset != "planar"
                        else {"preset": preset, "dim": 3}).cost == cost

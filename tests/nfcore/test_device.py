"""The engine on an accelerator gives the CPU's answers: every layer type and preset, plain and
conditional, in float64 and float32, both directions, the lean inference path, save and load
across devices, seeded sampling, and the three kinds of fit (density, posterior, amortized).

Each test runs on every accelerator torch sees (``cuda``), and is skipped where there is none, as
on CI. A few also run with ``device="cpu"``: they check the device-moving code itself (noise
drawn by a CPU generator, ``load(device=...)``), which the rest of the suite does not reach.
"""

import copy
import math

import pytest
import torch

import nfcore
from nfcore.targets import from_spec
from tests.nfcore.conftest import (
    CASES,
    CONDITIONAL_TYPES,
    make_flow,
    perturb,
    preset_spec,
    tolerance,
)

ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
EVERY_DEVICE = ["cpu", *ACCELERATORS]
#: Layers whose answer is an iterative or ODE solve to a tolerance: on another device the
#: solver's path differs by round-off, and so the answer by up to the solve's own tolerance.
SOLVED_TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(n: int, dim: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return 1.5 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _allowed(case: str) -> float:
    solved = any(k in case for k in ("residual", "resflow", "cnf", "sylvester"))
    return max(tolerance(case), SOLVED_TOLERANCE if solved else 1e-9)


def _on(flow: nfcore.Flow, device: str) -> nfcore.Flow:
    moved = copy.deepcopy(flow).to(device)
    assert moved.device.type == device
    return moved


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 1e-7) -> None:
    assert got.device.type != "meta"
    got = got.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=atol, rtol=rtol), (got - want).abs().max().item()


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("case", CASES)
def test_every_flow_gives_the_cpu_answers_in_both_directions(case, device):
    cpu = make_flow(case)
    dev = _on(cpu, device)
    x = _points(64, 3)
    with torch.no_grad():
        want_lp = cpu.log_prob(x)
        got_lp = dev.log_prob(x)  # CPU points: the flow moves them to its device
        assert got_lp.device.type == device
        _close(got_lp, want_lp, _allowed(case))
        want_x, want_lq = cpu.sample_from_noise(x)
        got_x, got_lq = dev.sample_from_noise(x.to(device))
        _close(got_x, want_x, _allowed(case), rtol=1e-6)
        _close(got_lq, want_lq, _allowed(case), rtol=1e-6)
        # and the device's own round trip
        z, _ = dev.transform(got_x)
        _close(z, x, _allowed(case), rtol=1e-6)


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("kind", CONDITIONAL_TYPES)
def test_conditional_layers_give_the_cpu_answers(kind, device):
    cpu = make_flow(f"layer:{kind}", context_dim=2)
    dev = _on(cpu, device)
    x, c = _points(32, 3), _points(32, 2, seed=5)
    with torch.no_grad():
        _close(dev.log_prob(x, c), cpu.log_prob(x, c), _allowed(kind))
        # one context row for every sample, as a served query has
        got = dev.sample_from_noise(x.to(device), c[:1].expand(32, -1).to(device))
        want = cpu.sample_from_noise(x, c[:1].expand(32, -1))
        _close(got[0], want[0], _allowed(kind), rtol=1e-6)
        _close(got[1], want[1], _allowed(kind), rtol=1e-6)


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("q", ["householder", "orthogonal"])
def test_fully_amortized_sylvester_layers_give_the_cpu_answers(q, device):
    """``amortize: "all"``: every context row its own Q (QR or reflections) and R, R~ (placed by
    index), the parts of the layer that only a context reaches."""
    spec = {"dim": 3, "context_dim": 2, "dtype": "float64",
            "layers": [{"type": "sylvester", "amortize": "all", "kind": q, "hidden": [16]}]}
    torch.manual_seed(0)
    cpu = perturb(nfcore.build(spec))
    dev = _on(cpu, device)
    x, c = _points(32, 3), _points(32, 2, seed=5)
    with torch.no_grad():
        _close(dev.log_prob(x, c), cpu.log_prob(x, c), SOLVED_TOLERANCE)
        got = dev.sample_from_noise(x.to(device), c.to(device))
        want = cpu.sample_from_noise(x, c)
        _close(got[0], want[0], SOLVED_TOLERANCE, rtol=1e-6)
        _close(got[1], want[1], SOLVED_TOLERANCE, rtol=1e-6)


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("preset", sorted(nfcore.PRESETS))
def test_float32_presets_on_the_device(preset, device):
    """float32 differs by round-off between devices (other kernels, other summation orders):
    relative 1e-4 of a log-density of order 10, and the same on the samples."""
    cpu = make_flow(f"preset:{preset}", dtype="float32", scale=0.2)
    dev = _on(cpu, device)
    x = _points(256, 3, dtype=torch.float32)
    with torch.no_grad():
        _close(dev.log_prob(x), cpu.log_prob(x), 2e-3, rtol=1e-4)
        got, want = dev.sample_from_noise(x.to(device)), cpu.sample_from_noise(x)
        _close(got[0], want[0], 2e-3, rtol=1e-4)
        _close(got[1], want[1], 2e-3, rtol=1e-4)


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("preset", ["nsf", "nsf_ar", "maf", "realnvp", "planar"])
def test_the_fast_inference_path_matches_eager_on_the_device(preset, device):
    """``fast_inference`` (cached masked weights, the lean spline kernels) on the device against
    the same flow's eager path on the device, under ``inference_mode`` as the server runs it."""
    flow = _on(make_flow(f"preset:{preset}"), device)
    eager = copy.deepcopy(flow)
    eager.fast_inference = False
    x = _points(1000, 3).to(device)
    with torch.inference_mode():
        _close(flow.log_prob(x), eager.log_prob(x).cpu(), 1e-9)
        got, want = flow.sample_from_noise(x), eager.sample_from_noise(x)
        _close(got[0], want[0].cpu(), 1e-9)
        _close(got[1], want[1].cpu(), 1e-9)
    flow.warm_up()


@pytest.mark.parametrize("device", EVERY_DEVICE)
def test_a_cpu_generator_drives_sampling_on_any_device(device):
    """``sample_and_log_prob(n, generator=g)`` with a CPU generator (what a caller has, and what
    the server uses so that a seed means the same draws everywhere) on a flow on ``device``."""
    cpu = make_flow("preset:nsf")
    dev = _on(cpu, device)
    with torch.no_grad():
        want = cpu.sample_and_log_prob(50, generator=torch.Generator().manual_seed(7))
        got = dev.sample_and_log_prob(50, generator=torch.Generator().manual_seed(7))
        assert got[0].device.type == device
        _close(got[0], want[0], 1e-9, rtol=1e-7)
        _close(got[1], want[1], 1e-9, rtol=1e-7)
        assert dev.sample(3, generator=torch.Generator().manual_seed(7)).device.type == device


@pytest.mark.parametrize("device", EVERY_DEVICE)
def test_a_flow_saved_on_one_device_loads_on_another(device):
    cpu = make_flow("preset:nsf_ar", context_dim=2)
    dev = _on(cpu, device)
    data = nfcore.saves(dev)
    # the content (weights and metadata) does not depend on where the flow lived
    assert nfcore.read_info(data).content_hash == nfcore.read_info(nfcore.saves(cpu)).content_hash
    x, c = _points(16, 3), _points(16, 2, seed=3)
    for where in ("cpu", device):
        back = nfcore.loads(data, device=where)
        assert back.device.type == where
        with torch.no_grad():
            _close(back.log_prob(x, c), cpu.log_prob(x, c), 1e-9)


def test_the_running_sum_by_adds_is_the_cumsum():
    """The spline's cumulative bin sizes off the CPU (``running_sum`` by adds): the same values
    as ``cumsum``, and the same gradients, here forced on the CPU."""
    from nfcore.layers.elementwise import running_sum

    t = torch.randn(5, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 3, 2, 8, dtype=torch.float64)
    by_adds = running_sum(t, by_adds=True)
    assert torch.allclose(by_adds, t.cumsum(-1), rtol=0, atol=1e-14)
    (g_adds,) = torch.autograd.grad((by_adds * weights).sum(), t)
    (g_scan,) = torch.autograd.grad((t.cumsum(-1) * weights).sum(), t)
    assert torch.allclose(g_adds, g_scan, rtol=0, atol=1e-14)
    assert torch.equal(running_sum(t.detach()), t.detach().cumsum(-1))  # CPU: the scan itself


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("case", ["preset:maf", "layer:lu_linear"])
def test_large_batches_are_solved_in_blocks(case, device, monkeypatch):
    """A batch larger than ``SOLVE_BLOCK_ROWS`` is solved in blocks (``loc_scale``'s forward,
    ``lu``'s inverse): the CPU's answers, with the block made small so the test stays small."""
    from nfcore.layers import linear

    monkeypatch.setattr(linear, "SOLVE_BLOCK_ROWS", 100)
    cpu = make_flow(case)
    dev = _on(cpu, device)
    x = _points(1050, 3)
    with torch.no_grad():
        _close(dev.log_prob(x), cpu.log_prob(x), 1e-9)
        got, want = dev.sample_from_noise(x.to(device)), cpu.sample_from_noise(x)
        _close(got[0], want[0], 1e-9)


# --------------------------------------------------------------------------- fits on the device
def _two_moons(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.stack([torch.cos(t), torch.sin(t)], -1)
    x = torch.where(upper[:, None], x, torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1))
    return 3.0 * x + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("device", ACCELERATORS)
def test_fit_density_on_the_device_fits_as_well_as_on_the_cpu(device):
    """The same seeded fit on both devices: held-out log-likelihood within 0.1 nats (the two
    runs differ by round-off, which training amplifies, but not by what a fit achieves)."""
    data, held = _two_moons(2000, 0), _two_moons(2000, 1)
    scores = {}
    for where in ("cpu", device):
        torch.manual_seed(0)
        flow = nfcore.build({"preset": "nsf", "dim": 2, "transforms": 3, "hidden": [32, 32],
                             "dtype": "float64"}).to(where)
        nfcore.fit_density(flow, data, steps=300, batch_size=256, lr=3e-3, seed=0)
        assert flow.device.type == where
        with torch.no_grad():
            scores[where] = flow.log_prob(held).mean().item()
    assert scores["cpu"] > -3.5, scores  # a fit, not a standard normal (about -4.6 here)
    assert abs(scores[device] - scores["cpu"]) < 0.1, scores


CONJUGATE = {"params": {"mu": {"shape": [3]}},
             "data": {"y": [[0.5, -1.0, 2.0], [1.5, 0.0, 2.5], [1.0, -0.5, 1.5]]},
             "log_prob": ["normal_lpdf(mu, 0, 2)", "normal_lpdf(y, mu, 1)"]}


def _conjugate_posterior() -> tuple[torch.Tensor, float]:
    y = torch.tensor(CONJUGATE["data"]["y"], dtype=torch.float64)
    precision = 1 / 4 + y.shape[0]
    return y.sum(0) / precision, precision ** -0.5


@pytest.mark.parametrize("device", ACCELERATORS)
def test_fit_target_on_the_device_finds_the_exact_posterior(device):
    flow = nfcore.build({"preset": "nsf", "dim": 3, "transforms": 2, "hidden": [16, 16],
                         "dtype": "float64"}).to(device)
    result = nfcore.fit_target(flow, from_spec(CONJUGATE), steps=300, ess_samples=4000, seed=0)
    assert flow.device.type == device
    diag = result.summary["diagnostics"]
    assert diag["verdict"] == "ok", diag
    mean, sd = _conjugate_posterior()
    with torch.no_grad():
        draws = flow.sample(8000, generator=torch.Generator().manual_seed(1)).cpu()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.1, (draws.mean(0), mean)
    assert ((draws.std(0) / sd) - 1).abs().max() < 0.1, draws.std(0) / sd


@pytest.mark.parametrize("device", ACCELERATORS)
def test_an_amortized_fit_on_the_device_answers_fresh_contexts(device):
    from tests.nfcore.test_amortized import MODEL, posterior, prior_predictive

    torch.manual_seed(0)
    flow = nfcore.build({"preset": "maf", "dim": 2, "context_dim": 3, "transforms": 2,
                         "hidden": [32, 32], "embedding": {"hidden": [32], "features": 8}})
    flow = flow.to(device)
    result = nfcore.fit_target(flow, from_spec(MODEL), contexts=prior_predictive(200, 0),
                               steps=500, lr=1e-2, batch_size=128, ess_samples=2000, seed=1,
                               start_contexts=2)
    assert result.summary["diagnostics"]["verdict"] in ("ok", "check")
    contexts = prior_predictive(4, 99)
    mean, sd = posterior(contexts)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for row, m in zip(contexts, mean, strict=True):
            draws = flow.sample(4000, context=row, generator=g).double().cpu()
            assert ((draws.mean(0) - m).abs() / sd).max() < 0.15, (draws.mean(0), m)
            assert ((draws.std(0) / sd) - 1).abs().max() < 0.15, draws.std(0) / sd


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("preset", sorted(nfcore.PRESETS))
def test_every_preset_trains_on_the_device(preset, device):
    """A short seeded ``fit_density`` of each preset (its own loss: maximum likelihood, or flow
    matching for ``cnf``) on both devices: the same held-out log-likelihood to 0.05 nats (the
    runs differ by round-off, amplified over 40 steps, not by what they fit)."""
    data, held = _two_moons(1000, 0), _two_moons(300, 1)
    scores = {}
    for where in ("cpu", device):
        torch.manual_seed(0)
        flow = nfcore.build(preset_spec(preset, dim=2, ode={"rtol": 1e-6, "atol": 1e-6}))
        flow = flow.to(where)
        nfcore.fit_density(flow, data, steps=40, batch_size=128, lr=3e-3, seed=0)
        assert flow.device.type == where
        with torch.no_grad():
            scores[where] = flow.log_prob(held).mean().item()
    assert math.isfinite(scores["cpu"]), scores
    assert abs(scores[device] - scores["cpu"]) < 0.05, scores


@pytest.mark.parametrize("device", ACCELERATORS)
def test_a_bounded_model_fits_on_the_device_as_on_the_cpu(device):
    """Eight schools (a lower bound, a derived quantity) by ``fit_target`` on both devices: the
    same ELBO to 0.1 nats, and draws in the model's own units with the bound kept."""
    from tests.nfcore.test_model_language import EIGHT_SCHOOLS

    target = from_spec(EIGHT_SCHOOLS)
    elbos = {}
    for where in ("cpu", device):
        torch.manual_seed(0)
        flow = nfcore.build({"preset": "nsf", "dim": target.dim, "transforms": 2,
                             "hidden": [16, 16], "dtype": "float64"}).to(where)
        result = nfcore.fit_target(flow, target, steps=100, ess_samples=2000, seed=0)
        elbos[where] = result.summary["elbo"]
        with torch.no_grad():
            z, log_q = flow.sample_and_log_prob(500, generator=torch.Generator().manual_seed(2))
        draws = target.draws(z, log_q)
        assert draws.columns[:2] == ["mu", "tau"]
        assert bool((draws.samples[:, 1] > 0).all())
        assert bool(torch.isfinite(draws.target_log_prob).all())
    assert abs(elbos[device] - elbos["cpu"]) < 0.1, elbos

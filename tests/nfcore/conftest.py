import pytest
import torch

import nfcore

LAYER_TYPES = sorted(nfcore.LAYER_TYPES)
PRESETS = sorted(nfcore.PRESETS)
CONDITIONAL_TYPES = ["affine_coupling", "maf", "iaf", "nsf_coupling", "nsf_ar", "residual",
                     "sylvester", "cnf", "planar", "radial"]
#: Layer types whose hidden widths the property tests set small, to keep the tests fast.
_NETWORKED = {"affine_coupling", "maf", "iaf", "nsf_coupling", "nsf_ar", "residual", "sylvester",
              "cnf"}
#: Layer types with a network only when conditional (the context network).
_CONTEXT_NETWORKED = {"planar", "radial"}
#: Layers that invert or integrate numerically: the grid test gives them a coarser grid.
SOLVED = ("residual", "resflow", "sylvester", "cnf")
#: The ODE tolerances the property tests run CNFs at (float64), and so check them against.
CNF_TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}


def tolerance(case: str, scale: float = 10.0) -> float:
    """The absolute tolerance a property test allows for a case: exact layers 1e-6 (as always);
    an ODE solve its stated per-step tolerance ``atol + rtol * |y|`` at values up to ``scale``
    (states and log-densities here stay within 10), times 100 for what a whole solve
    accumulates."""
    if "cnf" in case:
        return 100 * (CNF_TOLERANCE["atol"] + CNF_TOLERANCE["rtol"] * scale)
    return 1e-6


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared machine: one torch thread is faster and keeps timings steady.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@torch.no_grad()
def perturb(flow: nfcore.Flow, scale: float = 0.3, seed: int = 0) -> nfcore.Flow:
    """Move every parameter and fitted buffer off its (often identity) initial value, so property
    tests exercise a non-trivial bijection."""
    g = torch.Generator().manual_seed(seed)
    for p in flow.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for name, b in flow.named_buffers():
        if name.endswith(".loc"):
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
        elif name.endswith(".scale"):
            b.copy_(torch.exp(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype)))
    return flow


def layer_spec(kind: str, dim: int = 3, dtype: str = "float64", context_dim: int = 0,
               ode: dict | None = None) -> dict:
    layer = {"type": kind}
    if kind in _NETWORKED or (kind in _CONTEXT_NETWORKED and context_dim):
        layer["hidden"] = [16, 16]
    if kind == "cnf":
        layer.update(ode or CNF_TOLERANCE)
    return {"dim": dim, "context_dim": context_dim, "dtype": dtype, "layers": [layer]}


def preset_spec(preset: str, dim: int = 3, dtype: str = "float64", context_dim: int = 0,
                ode: dict | None = None) -> dict:
    spec = {"preset": preset, "dim": dim, "context_dim": context_dim, "dtype": dtype,
            "transforms": 3}
    if preset not in _CONTEXT_NETWORKED or context_dim:
        spec["hidden"] = [16, 16]
    if preset == "cnf":
        spec.update(ode or CNF_TOLERANCE)
        del spec["transforms"]
    return spec


#: Every layer type alone and every preset, as (id, spec-maker) pairs.
CASES = ([f"layer:{k}" for k in LAYER_TYPES] + [f"preset:{p}" for p in PRESETS]
         + ["mixing:nsf_ar-lu", "mixing:realnvp-random"])  # presets with another "mixing"


def case_spec(case: str, **kwargs) -> dict:
    kind, name = case.split(":")
    if kind == "mixing":
        preset, mixing = name.split("-")
        return {**preset_spec(preset, **kwargs), "mixing": mixing}
    return layer_spec(name, **kwargs) if kind == "layer" else preset_spec(name, **kwargs)


def make_flow(case: str, seed: int = 0, scale: float = 0.3, **kwargs) -> nfcore.Flow:
    torch.manual_seed(seed)
    return perturb(nfcore.build(case_spec(case, **kwargs)), scale=scale, seed=seed)

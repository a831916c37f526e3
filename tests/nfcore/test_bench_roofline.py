"""``benchmarks/roofline.py`` builds every preset with its benchmark architecture, at every dimension
it reports. A preset whose spec rules change (planar and radial took a ``hidden`` network only when
conditional) once crashed the benchmark halfway; this keeps its flows buildable. No timing."""

import importlib.util
from pathlib import Path

import pytest
import torch

import nfcore

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "roofline.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_roofline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", sorted(nfcore.PRESETS))
def test_roofline_builds_every_preset(preset):
    flow = _module().nfcore_flow(preset, 2)
    with torch.inference_mode():
        out = flow.log_prob(torch.zeros(3, 2))
    assert out.shape == (3,) and torch.isfinite(out).all()

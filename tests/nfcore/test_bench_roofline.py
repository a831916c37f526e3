"""``benchmarks/roofline.py`` builds every preset with its benchmark architecture, at every dimension
it reports. A preset whose spec rules change (planar and radial took a ``hidden`` network only when
conditional) once crashed the benchmark halfway; this keeps its flows buildable. No timing."""

import pytest
import torch

import nfcore

from .benchscripts import load_script


@pytest.mark.parametrize("preset", sorted(nfcore.PRESETS))
def test_roofline_builds_every_preset(preset):
    flow = load_script("roofline").nfcore_flow(preset, 2)
    with torch.inference_mode():
        out = flow.log_prob(torch.zeros(3, 2))
    assert out.shape == (3,) and torch.isfinite(out).all()

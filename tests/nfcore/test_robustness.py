"""No layer returns NaN or +-inf for any finite input in [-1e4, 1e4] (hypothesis)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.nfcore.conftest import CASES, make_flow

values = arrays(dtype="float64", shape=(8, 3),
                elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False))

FLOWS = {(case, dtype): make_flow(case, scale=0.3, dtype=dtype)
         for case in CASES for dtype in ("float64", "float32")}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=values)
def test_no_nan_or_inf_for_finite_inputs(case, dtype, x):
    flow = FLOWS[case, dtype]
    x = torch.from_numpy(x).to(flow.dtype)
    with torch.no_grad():
        z, ladj = flow.transform(x)
        assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
        y, log_q = flow.sample_from_noise(x)
        assert torch.isfinite(y).all() and torch.isfinite(log_q).all()

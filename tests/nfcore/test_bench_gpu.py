"""``benchmarks/gpu.py`` runs end to end on a CPU with its tiny sizes, so that the device benchmark
cannot rot between the sessions that have a GPU to run it on. No timing is asserted."""

import importlib.util
import os

import pytest

from .benchscripts import load_script


def _module():
    return load_script("gpu")


def test_gpu_benchmark_runs_tiny_on_cpu(capsys):
    has_zuko = importlib.util.find_spec("zuko") is not None
    rows = _module().main(["--device", "cpu", "--tiny", "--no-compile"]
                          + ([] if has_zuko else ["--no-zuko"]))
    assert [r[2] for r in rows] == ["100", "1,000"]
    for row in rows:
        assert row[0] == "nsf" and row[1] == 2
        assert float(row[3].replace(",", "")) > 0  # eager log_prob rows/s
        assert row[4] == "—"  # no CUDA graph on a CPU
        if has_zuko:
            assert float(row[6].replace(",", "")) > 0  # zuko's
    assert "| nsf | 2 | 1,000 |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NFSERVE_COMPILE_TESTS"),
                    reason="torch.compile takes minutes on a small shared CPU; set "
                           "NFSERVE_COMPILE_TESTS=1 to run it")
def test_gpu_benchmark_compiled_path_runs_tiny_on_cpu():
    """The compiled column too (one compile of a 1-transform flow, dynamic shapes)."""
    rows = _module().main(["--device", "cpu", "--tiny", "--no-zuko", "--batches", "64"])
    assert float(rows[0][5].replace(",", "")) > 0
    assert float(rows[0][10].replace(",", "")) > 0

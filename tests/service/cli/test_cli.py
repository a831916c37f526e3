"""``nfserve`` subcommands: ``train`` (local, progress bar, into the store; budgets and
diagnostics), ``models``, ``sample``, ``worker --check``, their errors, and the entry point in a
real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nfcore
from service.cli import build_parser, main
from service.training.requests import OPTIONS

from ..jobsupport import ROOT, two_moons

torch.set_num_threads(1)

FLOW = ["--preset", "maf", "--transforms", "2", "--hidden", "8"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("NFSERVE_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env
    models = tmp_path / "models"
    monkeypatch.setenv("NFSERVE_MODELS_DIR", str(models))
    monkeypatch.setenv("NFSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NFSERVE_DEVICE", "cpu")
    return models


@pytest.fixture
def moons_csv(tmp_path: Path) -> Path:
    path = tmp_path / "moons.csv"
    np.savetxt(path, two_moons(300), delimiter=",", header="x,y", comments="")
    return path


def test_parser_has_every_subcommand() -> None:
    parser = build_parser()
    for argv in (["serve"], ["worker"], ["train", "m", "--data", "x.csv"], ["sample", "m"],
                 ["models"]):
        assert parser.parse_args(argv).command == argv[0]


def test_train_writes_versions_to_the_store_with_a_progress_bar(
        store: Path, moons_csv: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "moons", "--data", str(moons_csv), "--steps", "30", *FLOW]) == 0
    out, err = capsys.readouterr()
    assert "moons version 1" in out
    assert "30/30" in err  # the tqdm bar reached the end
    flow = nfcore.load(store / "moons" / "1" / "model.safetensors")
    assert flow.dim == 2
    summary = json.loads(flow.metadata["training"])
    assert summary["steps"] == 30 and summary["objective"] == "density"

    assert main(["train", "moons", "--data", str(moons_csv), "--steps", "10", "--quiet",
                 *FLOW]) == 0
    assert (store / "moons" / "2" / "model.safetensors").exists()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("source", [
    ["--target", "U1"],
    ["--expression", "-0.5*sum((z - 1)**2)", "--dim", "2"],
    ["--target", "funnel", "--target-options", '{"dim": 3}'],
])
def test_train_variational(store: Path, source: list[str]) -> None:
    assert main(["train", "vi", *source, "--steps", "15", "--quiet", *FLOW]) == 0
    assert (store / "vi" / "1" / "model.safetensors").exists()


def test_models_lists_names_and_versions(store: Path, moons_csv: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    assert "(no models)" in capsys.readouterr().out
    for _ in range(2):
        main(["train", "moons", "--data", str(moons_csv), "--steps", "5", "--quiet", *FLOW])
    capsys.readouterr()
    assert main(["models"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("moons") and "versions 1,2" in line and "dim 2" in line
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["versions"] == [1, 2]


def test_sample_writes_seeded_csv_and_npy(store: Path, moons_csv: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    main(["train", "moons", "--data", str(moons_csv), "--steps", "5", "--quiet", *FLOW])
    out_a, out_b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(["sample", "moons", "-n", "12", "--seed", "7", "--out", str(out_a)]) == 0
    assert main(["sample", "moons", "-n", "12", "--seed", "7", "--out", str(out_b)]) == 0
    lines = out_a.read_text().splitlines()
    assert lines[0] == "x0,x1,log_prob" and len(lines) == 13
    assert out_a.read_text() == out_b.read_text()
    assert main(["sample", "moons", "-n", "4", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (4, 3)
    capsys.readouterr()
    assert main(["sample", "moons", "-n", "3", "--version", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4  # header and 3 rows on stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "m", "--steps", "5"], "give exactly one of --data"),
    (["train", "m", "--expression=-sum(z**2)"], "--expression needs --dim"),
    (["train", "m", "--target", "U9"], "Unknown target 'U9'"),
    (["train", "bad name", "--target", "U1"], "Expected a model name"),
    (["train", "m", "--target", "U1", "--flow", '{"preset": "maf", "dim": 2, "x": 1}'],
     "unknown key"),
    (["sample", "nope"], "Unknown model 'nope'"),
])
def test_errors_exit_2_with_a_message(store: Path, argv: list[str], message: str,
                                      capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_train_refuses_bad_data_with_positions(store: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,nan\n4,5\n")
    assert main(["train", "m", "--data", str(bad), "--steps", "5"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert not (store / "m").exists()


def test_worker_check(store: Path, capsys: pytest.CaptureFixture,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    store.mkdir()
    assert main(["worker", "--check"]) == 0
    monkeypatch.setenv("NFSERVE_QUEUE_URL", "redis://127.0.0.1:1/0")
    assert main(["worker", "--check"]) == 1
    assert "queue unreachable" in capsys.readouterr().err


def test_entry_point_in_a_subprocess(store: Path, moons_csv: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "service.cli", "train", "sub", "--data",
                          str(moons_csv), "--steps", "5", "--quiet", *FLOW],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "service.cli", "models", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and json.loads(run.stdout)[0]["name"] == "sub"


DIAGNOSTICS = {"pareto_k": 0.93, "ess_fraction": 0.12, "tail_fraction": 0.04,
               "verdict": "unreliable", "reasons": ["pareto_k 0.93 > 0.7", "4 % in spline tails"]}


def spy_fits(monkeypatch: pytest.MonkeyPatch, summary: dict | None = None) -> list[dict]:
    """Record the options each nfcore fit gets, and add ``summary`` to its result's summary."""
    calls: list[dict] = []
    for name in ("fit_density", "fit_target"):
        real = getattr(nfcore, name)

        def spy(flow, source, real=real, **options):
            calls.append({k: v for k, v in options.items() if k in OPTIONS})
            result = real(flow, source, **options)
            result.summary.update(summary or {})
            return result

        monkeypatch.setattr(nfcore, name, spy)
    return calls


@pytest.mark.parametrize(("flags", "passed"), [
    (["--max-seconds", "0.5"], {"max_seconds": 0.5}),
    (["--steps", "7"], {"steps": 7}),
    (["--steps", "7", "--max-seconds", "30", "--lr", "0.01"],
     {"steps": 7, "max_seconds": 30.0, "lr": 0.01}),
])
def test_train_passes_on_only_the_budget_and_options_given(
        store: Path, moons_csv: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str],
        passed: dict) -> None:
    calls = spy_fits(monkeypatch)
    assert main(["train", "moons", "--data", str(moons_csv), "--quiet", *FLOW, *flags]) == 0
    assert calls == [passed]


def test_train_prints_the_verdict_and_its_reasons(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    spy_fits(monkeypatch, summary={"diagnostics": DIAGNOSTICS})
    assert main(["train", "vi", "--target", "U1", "--steps", "5", "--quiet", *FLOW]) == 0
    out = capsys.readouterr().out
    assert "diagnostics: unreliable" in out
    assert "  - pareto_k 0.93 > 0.7\n" in out and "  - 4 % in spline tails\n" in out


def test_train_of_a_density_prints_its_verdict(store: Path, moons_csv: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """A density fit has diagnostics too (held-out rows against the data's Gaussian): three
    steps are far from a fit, and the verdict is printed with its reasons."""
    assert main(["train", "moons", "--data", str(moons_csv), "--steps", "3", "--quiet",
                 *FLOW]) == 0
    out = capsys.readouterr().out
    verdict = out.split("diagnostics: ", 1)[1].split("\n", 1)[0]
    assert verdict in ("ok", "check", "unreliable"), out
    assert verdict == "ok" or "\n  - " in out

"""Schema fuzzing: Schemathesis (its CLI, as a user runs it) against a real server's
``/openapi.json``, with its examples, fuzzing and stateful phases and the checks
``not_a_server_error``, ``status_code_conformance``, ``content_type_conformance`` and
``response_schema_conformance``: at least 5,000 generated cases and zero failures, so every status
the service answers is documented and every body, error bodies included, matches its schema.

The server is real (uvicorn) with a real training worker, so that readiness is genuinely ready
while fuzzed jobs wait; the training limits are tiny (one step, or a millisecond), so the jobs
that fuzzing gets accepted cost nothing. The demo model ``two_moons`` is in its store, so the
schema's own examples reach the inference logic. Slow operations (the plot, uploads) get fewer
cases than the rest. It runs with a fixed seed and within a bounded time (``MAX_SECONDS``).

Cost, measured on the shared 2-core development machine at a load average of 7-9: 6,320 cases in
565 s wall, of which 279 s were the fuzzer's own CPU (its case generation is single-threaded
Python, ~45 ms a case there); on two idle cores that is about 4-5 min, the server using the other
core. The bound (``MAX_SECONDS``) is generous for loaded machines; the test prints its own
figures (``-s``). Fewer ``max-examples`` per operation shorten it, down to the 5,000-case floor. One worker: with two (threads),
hypothesis's lambda descriptions once raced in CPython 3.11's ``ast.parse`` ("AST constructor
recursion depth mismatch"), an error of the fuzzer, not of the service.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ROOT, Server, start_server, stop_server

from .oip.metricsupport import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
MIN_CASES = 5000
MAX_SECONDS = 1400  # the whole run's bound, for a loaded machine (see the module docstring)

CONFIG = """
[generation]
max-examples = {examples}

[[operations]]
include-path-regex = "plot.png|^/models$|^/datasets$"
generation.max-examples = {slow}
"""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    env = {"NFSERVE_MAX_ROWS": "5000", "NFSERVE_MAX_SAMPLE_N": "5000",
           "NFSERVE_MAX_BODY_BYTES": "400000", "NFSERVE_MAX_UPLOAD_BYTES": "200000",
           "NFSERVE_MAX_TRAIN_STEPS": "1", "NFSERVE_MAX_TRAIN_SECONDS": "0.001",
           "NFSERVE_HEARTBEAT_TIMEOUT_S": "60", "NFSERVE_WARMUP_ROWS": "0"}
    srv = start_server(root, env)
    shutil.copytree(ROOT / "models" / "two_moons", srv.models_dir / "two_moons")
    worker_env = {**os.environ, "NFSERVE_MODELS_DIR": str(srv.models_dir),
                  "NFSERVE_DATA_DIR": str(root / "data"), "PYTHONPATH": str(ROOT), **env}
    log = open(root / "worker.log", "wb")  # noqa: SIM115 - closed with the process
    worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=root,
                              env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "live workers" in httpx.get(srv.url + "/health/ready").text,
                 "the worker's first heartbeat", tries=1200)
        yield srv
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        stop_server(srv)


def test_schemathesis_finds_no_failure(fuzzed: Server, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(examples=285, slow=25))
    report = tmp_path / "report.json"
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         fuzzed.url + "/openapi.json", "--phases", "examples,fuzzing,stateful",
         "--checks", CHECKS, "--workers", "1", "--seed", "20261130", "--no-shrink",
         "--request-timeout", "60", "--suppress-health-check", "all",
         "--report", "json", "--report-json-path", str(report), "--no-color"],
        capture_output=True, text=True, timeout=MAX_SECONDS, cwd=tmp_path)
    wall = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = run.stdout[-20000:] + run.stderr[-5000:]
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]
    print(f"schemathesis: {cases['generated']} cases in {wall:.0f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime:.0f} s of "
          f"its own CPU; load average {os.getloadavg()}")
    assert summary["failures"] == [], output
    assert cases["with_failures"] == 0 and cases["errored"] == 0, output
    assert summary["operations"]["errored"] == 0, output
    assert run.returncode == 0, output
    assert cases["generated"] >= MIN_CASES, cases
    assert summary["operations"]["tested"] == summary["operations"]["total"]

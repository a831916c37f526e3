"""The client installs alone: ``pip install .`` with no extras, in a fresh virtual environment,
brings httpx, numpy, safetensors and orjson, and neither torch nor the server's packages, and the
client and the command line's help work there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

PROBE = """
import importlib.util, json
import service.client
print(json.dumps({name: importlib.util.find_spec(name) is not None for name in
                  ["torch", "fastapi", "sqlalchemy", "huey", "httpx", "numpy", "safetensors",
                   "orjson"]}))
"""


def test_pip_install_without_extras_is_the_client_without_torch(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy, so the build writes nothing into the repository
    for package in ("nfcore", "service"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile",
                          "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found == {"torch": False, "fastapi": False, "sqlalchemy": False, "huey": False,
                     "httpx": True, "numpy": True, "safetensors": True, "orjson": True}
    help_run = subprocess.run([env_dir / "bin" / "nfserve", "--help"], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    assert help_run.returncode == 0 and "serve" in help_run.stdout, help_run.stderr
    assert sys.executable != str(python)  # the probe ran in the new environment, not this one

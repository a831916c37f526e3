"""Fixtures of the training-path tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    """The app in-process with no worker: submissions are checked and recorded, never run."""
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data",
                        embedded_worker=False, device="cpu", _env_file=None)
    with TestClient(create_app(settings)) as client:
        yield client

"""``docker-compose.yml`` and the ``Dockerfile`` agree with the code: every command parses with the
real CLI, every ``NFSERVE_*`` variable is a setting with a valid value, the services share the
store volumes, and the health checks call ``/health/ready`` (API) and ``worker --check``."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from service.cli import build_parser
from service.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extras")

ROOT = Path(__file__).resolve().parents[2]
NFSERVE_SERVICES = ("api", "worker", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _settings_from(env: dict[str, str]) -> Settings:
    values = {k[len("NFSERVE_"):].lower(): v for k, v in env.items() if k.startswith("NFSERVE_")}
    unknown = sorted(set(values) - set(Settings.model_fields))
    assert not unknown, f"not settings: {unknown}"
    return Settings(_env_file=None, **{k: re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", v)
                                       for k, v in values.items()})


def test_services_and_volumes(compose: dict) -> None:
    services = compose["services"]
    assert {"api", "worker", "worker-gpu", "redis", "postgres"} <= set(services)
    assert {"models", "data"} <= set(compose["volumes"])


@pytest.mark.parametrize("name", NFSERVE_SERVICES)
def test_commands_parse_with_the_cli(compose: dict, name: str) -> None:
    command = compose["services"][name]["command"]
    assert command[0] == "nfserve"
    args = build_parser().parse_args(command[1:])
    assert args.command == ("serve" if name == "api" else "worker")


@pytest.mark.parametrize("name", NFSERVE_SERVICES)
def test_environment_names_and_values_are_settings(compose: dict, name: str) -> None:
    service = compose["services"][name]
    settings = _settings_from(service["environment"])
    assert settings.queue_url == "redis://redis:6379/0"
    assert settings.resolved_database_url.startswith("postgresql+psycopg://nfserve:")
    assert "@postgres:5432/nfserve" in settings.resolved_database_url
    mounts = dict(v.split(":")[::-1] for v in service["volumes"])
    assert mounts[str(settings.models_dir)] == "models"  # the shared model store
    assert mounts[str(settings.data_dir)] == "data"  # shared datasets and checkpoints


def test_api_runs_without_an_embedded_worker_and_checks_readiness(compose: dict) -> None:
    api = compose["services"]["api"]
    assert _settings_from(api["environment"]).embedded_worker is False
    test = " ".join(api["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health/ready" in test
    assert api["ports"][0].endswith(":8000")
    assert {"postgres", "redis"} <= set(api["depends_on"])


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_worker_health_check_is_the_cli_check(compose: dict, name: str) -> None:
    test = compose["services"][name]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "nfserve"
    args = build_parser().parse_args(test[2:])
    assert args.command == "worker" and args.check is True


def test_gpu_worker_is_a_profile_with_a_gpu_reservation(compose: dict) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert _settings_from(gpu["environment"]).device == "cuda"
    assert "profiles" not in compose["services"]["worker"]  # a CPU worker runs by default


def test_database_credentials_match_the_postgres_service(compose: dict) -> None:
    pg = compose["services"]["postgres"]["environment"]
    url = compose["services"]["api"]["environment"]["NFSERVE_DATABASE_URL"]
    assert url == (f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{pg['POSTGRES_DB']}")
    assert "pg_isready" in " ".join(compose["services"]["postgres"]["healthcheck"]["test"])
    assert "ping" in compose["services"]["redis"]["healthcheck"]["test"]


def test_dockerfile_matches_the_cli_settings_and_repository() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    cmd = next(line for line in lines if line.startswith("CMD "))
    argv = yaml.safe_load(cmd[len("CMD "):])
    assert argv[0] == "nfserve" and build_parser().parse_args(argv[1:]).command == "serve"
    text = " ".join(line.rstrip("\\") for line in lines if not line.startswith("#"))
    env = dict(re.findall(r"(NFSERVE_\w+)=(\S+)", text))
    settings = _settings_from(env)
    assert str(settings.models_dir) == "/models" and str(settings.data_dir) == "/data"
    for line in lines:
        if line.startswith("COPY "):
            source = shlex.split(line)[1:-1]
            assert all((ROOT / s).exists() for s in source), line
    assert 'torch==${TORCH_VERSION}' in text and "ARG TORCH_VERSION=2.13.0" in text

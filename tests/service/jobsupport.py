"""Support for the jobs tests: real ``nfserve serve`` / ``nfserve worker`` processes, and real Redis
and PostgreSQL servers isolated per test session.

Redis and PostgreSQL: the ones on 127.0.0.1 (6379, 5432) when they answer, else a throw-away
``redis-server`` and a temporary PostgreSQL cluster (``initdb`` + ``pg_ctl``) started here; the
tests are skipped, with the reason, only when neither is possible. ``NFSERVE_TEST_REDIS_URL`` and
``NFSERVE_TEST_POSTGRES_URL`` point them elsewhere. Each session gets its own PostgreSQL database
and its own Huey queue name (Redis key prefix), dropped at the end, so runs never collide.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY_FLOW = {"preset": "maf", "dim": 2, "transforms": 2, "hidden": [8]}

#: Fast beats and checkpoints so that recovery happens in seconds, one torch thread per process.
FAST_ENV = {
    "NFSERVE_HEARTBEAT_INTERVAL_S": "0.25",
    "NFSERVE_HEARTBEAT_TIMEOUT_S": "3",
    "NFSERVE_CHECKPOINT_EVERY_S": "0.25",
    # CPU unless a GPU run asks otherwise (.ci/cuda sets NFSERVE_TEST_DEVICE=cuda).
    "NFSERVE_DEVICE": os.environ.get("NFSERVE_TEST_DEVICE", "cpu"),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def published(job: dict[str, Any]) -> dict[str, Any]:
    """A succeeded job's model and version; its result also holds the fit's diagnostics (every
    fit has them: a density fit's, a variational fit's), which this checks are there."""
    result = job["result"]
    assert result["diagnostics"]["verdict"] in ("ok", "check", "unreliable"), result
    return {"model": result["model"], "version": result["version"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], *, timeout: float = 120.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (a generous deadline, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def two_moons(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.column_stack([x, y]) + 0.05 * rng.standard_normal((n, 2))


# ---------------------------------------------------------------------- processes
@dataclass
class Proc:
    """A service process started by a test, with its log file."""

    process: subprocess.Popen
    log: Path
    url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill9(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


@dataclass
class Deployment:
    """Directories and settings shared by the API and worker processes of one test."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NFSERVE_")}
        env.update({"NFSERVE_MODELS_DIR": str(self.models_dir),
                    "NFSERVE_DATA_DIR": str(self.data_dir),
                    "PYTHONPATH": str(ROOT), **FAST_ENV, **self.env, **(extra or {})})
        return env

    def _spawn(self, args: list[str], name: str, extra: dict[str, str] | None) -> Proc:
        log = self.root / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as fh:
            process = subprocess.Popen([sys.executable, "-m", "service.cli", *args],
                                       cwd=self.root, env=self.full_env(extra), stdout=fh,
                                       stderr=subprocess.STDOUT)
        proc = Proc(process, log)
        self.procs.append(proc)
        return proc

    def start_api(self, *, embedded_worker: bool, port: int | None = None,
                  extra: dict[str, str] | None = None) -> Proc:
        port = port or free_port()
        proc = self._spawn(["serve", "--port", str(port)], "api",
                           {"NFSERVE_EMBEDDED_WORKER": str(embedded_worker).lower(),
                            **(extra or {})})
        proc.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.process.poll() is not None:
                raise AssertionError(f"API exited:\n{proc.output()}")
            try:
                return httpx.get(proc.url + "/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=120, what="the API to be ready")
        return proc

    def start_worker(self, extra: dict[str, str] | None = None) -> Proc:
        return self._spawn(["worker"], "worker", extra)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=20)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()}" for p in self.procs)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A fresh data and model directory for real processes, all stopped at the end."""
    d = Deployment(tmp_path)
    d.models_dir.mkdir()
    try:
        yield d
    finally:
        d.stop_all()


def wait_job(client: Any, job_id: str, deployment: Deployment | None = None, *,
             statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 180.0) -> dict:
    """Poll ``GET /jobs/{id}`` until the job reaches one of ``statuses``; the process logs go
    into the failure message."""
    last: dict = {}

    def reached() -> bool:
        last.update(client.job(job_id))
        return last["status"] in statuses

    try:
        wait_for(reached, timeout=timeout, interval=0.2, what=f"job {job_id} to be {statuses}")
    except AssertionError as e:
        logs = deployment.logs() if deployment else ""
        raise AssertionError(f"{e}; last seen {last}\n{logs}") from None
    return dict(last)


# ---------------------------------------------------------------------- job store helpers
def job_row(deployment_or_url: Deployment | str, job_id: str) -> Any:
    """Read a job straight from the job store (not through the API)."""
    from service.training import Database

    url = (deployment_or_url if isinstance(deployment_or_url, str)
           else deployment_or_url.env.get("NFSERVE_DATABASE_URL")
           or f"sqlite:///{deployment_or_url.data_dir / 'nfserve.db'}")
    db = Database(url)
    try:
        return db.get_job(job_id)
    finally:
        db.dispose()


# ---------------------------------------------------------------------- Redis
def _redis_ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A reachable Redis: $NFSERVE_TEST_REDIS_URL, 127.0.0.1:6379, or a throw-away server."""
    url = os.environ.get("NFSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_ping(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(f"no Redis at {url} and no redis-server binary to start one")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="nfserve-redis-")
    pidfile = Path(workdir) / "redis.pid"
    subprocess.run([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(pidfile),
                    "--dir", workdir], check=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _redis_ping(url), timeout=30, what="redis-server")
        yield url
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def queue_name(redis_url: str) -> Iterator[str]:
    """A Huey queue name of its own (the Redis key prefix), deleted at the end of the session."""
    import redis

    name = f"nfserve_test_{uuid.uuid4().hex[:12]}"
    yield name
    conn = redis.Redis.from_url(redis_url)
    keys = list(conn.scan_iter(match=f"huey.*{name}*"))
    if keys:
        conn.delete(*keys)


# ---------------------------------------------------------------------- PostgreSQL
def _pg_connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, connect_timeout=2, autocommit=True)


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A libpq DSN of a PostgreSQL server we may create databases on: $NFSERVE_TEST_POSTGRES_URL
    (else 127.0.0.1:5432, user postgres, database test) or, when that does not answer, a
    temporary cluster started here."""
    import psycopg

    given = os.environ.get("NFSERVE_TEST_POSTGRES_URL")
    candidates = [given] if given else ["postgresql://postgres@127.0.0.1:5432/test",
                                        "postgresql://postgres@127.0.0.1:5432/postgres"]
    for dsn in candidates:
        try:
            _pg_connect(dsn).close()
            yield dsn
            return
        except psycopg.Error:
            continue
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432 and no initdb/pg_ctl to start one")
    workdir = tempfile.mkdtemp(prefix="nfserve-pg-")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser; cannot start a PostgreSQL cluster")
        shutil.chown(workdir, "postgres", "postgres")
        run_as = [runuser, "-u", "postgres", "--"]
    data = Path(workdir) / "data"
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(Path(workdir) / "log"), "-w",
                    "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1", "start"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A SQLAlchemy URL of a database created for this session and dropped at its end."""
    name = f"nfserve_test_{uuid.uuid4().hex[:12]}"
    with _pg_connect(postgres_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_server.rpartition("/")
    yield base.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    with _pg_connect(postgres_server) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

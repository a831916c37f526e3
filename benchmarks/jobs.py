"""Job throughput: short density jobs per minute through the queue with one worker and with two,
next to calling ``nfcore.fit_density`` directly in this process, in the same run.

Each queue run starts a real API (``nfserve serve``, no embedded worker) and N real worker
processes (``nfserve worker``) on fresh directories, submits the jobs over HTTP and waits until all
have succeeded; throughput is jobs / (last ``finished_at`` - first submission). The overhead of the
queue is (a) the latency of one job on an idle worker minus the time ``fit_density`` takes for the
same job, and (b) per job, one-worker makespan / jobs minus the direct time per job.

Every process trains with one torch thread (``OMP_NUM_THREADS=1``), as does the direct baseline.
Modes: ``embedded`` (SQLite job store, SqliteHuey) and ``distributed`` (PostgreSQL and Redis;
default URLs are the local servers, a fresh database is created and dropped).

    python benchmarks/jobs.py [--jobs 12] [--steps 200] [--modes embedded,distributed]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import nfcore  # noqa: E402
from benchmarks._machine import cpu_model  # noqa: E402
from service.client import Client  # noqa: E402
from service.training import Database, JobRecord  # noqa: E402
from tests.service.jobsupport import two_moons  # noqa: E402  (the tests' toy data)

FLOW = {"preset": "maf", "dim": 2, "transforms": 3, "hidden": [16, 16]}
RESULT = ROOT / "benchmarks" / "results" / "jobs.md"


def machine() -> str:
    cpu = cpu_model()
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, PostgreSQL and Redis on "
            f"127.0.0.1")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training(args: argparse.Namespace, seed: int) -> dict:
    # No early stopping, so every job takes exactly `steps` steps in every mode.
    return {"steps": args.steps, "batch_size": 128, "seed": seed, "validation_fraction": 0.0}


# ---------------------------------------------------------------------- direct baseline
def direct(args: argparse.Namespace, data: np.ndarray) -> list[float]:
    torch.set_num_threads(1)
    nfcore.fit_density(nfcore.build(FLOW), data, **training(args, 0))  # warm-up, not timed
    times = []
    for i in range(args.jobs):
        torch.manual_seed(i)
        flow = nfcore.build(FLOW)
        t0 = time.perf_counter()
        nfcore.fit_density(flow, data, **training(args, i))
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------- queue
class Cluster:
    def __init__(self, env: dict[str, str], workers: int):
        self.root = Path(tempfile.mkdtemp(prefix="nfserve-bench-"))
        (self.root / "models").mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NFSERVE_")}
        self.env.update({"NFSERVE_MODELS_DIR": str(self.root / "models"),
                         "NFSERVE_DATA_DIR": str(self.root / "data"), "NFSERVE_DEVICE": "cpu",
                         "NFSERVE_EMBEDDED_WORKER": "false", "OMP_NUM_THREADS": "1",
                         "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env})
        self.procs: list[subprocess.Popen] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._spawn(["serve", "--port", str(port), "--log-level", "warning"], "api")
        self._wait(lambda: self._ready(), "API")
        logs = [self._spawn(["worker", "--log-level", "info"], f"worker{i}")
                for i in range(workers)]
        for log in logs:
            self._wait(lambda log=log: "thread(s), queue" in log.read_text(errors="replace"),
                       "worker")

    def _spawn(self, args: list[str], name: str) -> Path:
        log = self.root / f"{name}.log"
        with open(log, "wb") as fh:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", *args],
                                               cwd=self.root, env=self.env, stdout=fh,
                                               stderr=subprocess.STDOUT))
        return log

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.1)

    @property
    def database_url(self) -> str:
        return self.env.get("NFSERVE_DATABASE_URL") or f"sqlite:///{self.root / 'data/nfserve.db'}"

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def run_jobs(cluster: Cluster, args: argparse.Namespace, data: np.ndarray, n: int
             ) -> tuple[float, list]:
    """Submit ``n`` jobs at once; (seconds from first submission to last finish, job rows)."""
    with Client(cluster.url) as client:
        dataset = client.upload_dataset(data)
        objective = {"kind": "density", "dataset": dataset["id"]}
        t0 = time.time()
        ids = [client.train("bench", FLOW, objective, training(args, i))["job_id"]
               for i in range(n)]
        wanted = set(ids)
        while True:  # one light request per poll, so polling steals little CPU from the workers
            time.sleep(0.5)
            jobs = [j for j in client.jobs(name="bench", limit=1000) if j["id"] in wanted]
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
                break
    bad = [j for j in jobs if j["status"] != "succeeded"]
    if bad:
        raise RuntimeError(f"jobs did not succeed: {bad[0]}")
    db = Database(cluster.database_url)
    with db.session() as s:
        rows = [s.get(JobRecord, i) for i in ids]
    db.dispose()
    for r in rows:  # the fit_density call's own wall time inside the worker
        r.elapsed = r.summary["wall_s"]
    return max(r.finished_at for r in rows) - t0, rows


def queue_mode(mode: str, make_env, args: argparse.Namespace, data: np.ndarray,
               direct_mean: float) -> list[list[object]]:
    """Both worker counts, each on a fresh store, database and queue from ``make_env()``."""
    rows = []
    one_worker_makespan = None
    for workers in (1, 2):
        env, cleanup = make_env()
        cluster = Cluster(env, workers)
        try:
            # Single jobs on idle workers (also warms the workers up): where the time goes.
            latencies, waits, in_worker, train_times = [], [], [], []
            for _ in range(args.single):
                _, (row,) = run_jobs(cluster, args, data, 1)
                latencies.append(row.finished_at - row.created_at)
                waits.append(row.started_at - row.created_at)
                in_worker.append(row.finished_at - row.started_at - row.elapsed)  # fit wall
                train_times.append(row.elapsed)
            makespan, job_rows = run_jobs(cluster, args, data, args.jobs)
        finally:
            cluster.close()
            cleanup()
        per_minute = args.jobs / makespan * 60
        if workers == 1:
            one_worker_makespan = makespan
        used = len({r.worker for r in job_rows})
        med = statistics.median
        rows.append([mode, workers, used, args.jobs, round(makespan, 2), round(per_minute, 1),
                     round(med(latencies), 3), round(med(train_times), 3), round(med(waits), 3),
                     round(med(in_worker), 3), round(med(latencies) - med(train_times), 3),
                     round(one_worker_makespan / args.jobs - direct_mean, 3)
                     if workers == 1 else ""])
        print(rows[-1], flush=True)
    return rows


def distributed_env(args: argparse.Namespace) -> tuple[dict[str, str], callable]:
    import psycopg

    server = args.postgres_url
    name = f"nfserve_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = server.rpartition("/")[0].replace("postgresql://", "postgresql+psycopg://", 1)
    queue = f"nfserve_bench_{uuid.uuid4().hex[:10]}"

    def drop() -> None:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        import redis

        r = redis.Redis.from_url(args.redis_url)
        keys = list(r.scan_iter(match=f"huey.*{queue}*"))
        if keys:
            r.delete(*keys)

    return ({"NFSERVE_DATABASE_URL": f"{base}/{name}", "NFSERVE_QUEUE_URL": args.redis_url,
             "NFSERVE_QUEUE_NAME": queue}, drop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--single", type=int, default=5, help="single-job latency runs")
    parser.add_argument("--modes", default="embedded,distributed")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the clusters on SIGTERM
    data = two_moons(args.rows)

    times = direct(args, data)
    direct_mean = statistics.mean(times)
    print(f"direct fit_density: {direct_mean:.3f} s per job, "
          f"{60 / direct_mean:.1f} jobs/min", flush=True)
    load_before = os.getloadavg()

    table = []
    for mode in args.modes.split(","):
        if mode == "embedded":
            table += queue_mode("embedded (SQLite + SqliteHuey)", lambda: ({}, lambda: None),
                                args, data, direct_mean)
        elif mode == "distributed":
            table += queue_mode("distributed (PostgreSQL + Redis)",
                                lambda: distributed_env(args), args, data, direct_mean)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    load_after = os.getloadavg()
    after = direct(args, data)  # again, so the baseline saw the same load as the queue runs
    times += after
    direct_mean = statistics.mean(times)
    table.insert(0, ["direct fit_density (this process)", "-", "-", len(times),
                     round(sum(times), 2), round(60 / direct_mean, 1), round(direct_mean, 3),
                     round(direct_mean, 3), 0.0, 0.0, 0.0, 0.0])

    headers = ["path", "workers", "workers used", "jobs", "makespan s", "jobs/min",
               "1-job latency s", "train s", "queue wait s", "worker setup+publish s",
               "overhead s", "overhead per job vs direct s"]
    body = (
        f"Short density jobs: `{FLOW}` on {args.rows} two-moons rows, {args.steps} steps of "
        f"batch 128, no validation split; {args.jobs} jobs submitted at once. One torch thread "
        f"per process.\n\n"
        + markdown_table(headers, table)
        + "\n\n- *makespan*: first `POST /train` to the last job's `finished_at` (direct: the "
          "sum of the `fit_density` calls, run before and after the queue runs).\n"
          "- *1-job latency*: `POST /train` to `finished_at` of one job on an idle worker "
          "(median of --single runs), split into *train* (the `fit_density` call's wall time "
          "in the worker), *queue "
          "wait* (`created_at` to `started_at`: enqueue, dequeue, claim) and *worker "
          "setup+publish* (dataset load, flow build, model write with fsync, bookkeeping). "
          "*overhead* = latency - train; it is measured in the same process and run, so the "
          "machine's load affects it least.\n"
          "- *overhead per job vs direct*: one-worker makespan / jobs minus the mean direct "
          "`fit_density` time; noisier, as the two ran at different moments.\n"
          f"- Load average (1 min) before / after the queue runs: {load_before[0]:.2f} / "
          f"{load_after[0]:.2f} on {os.cpu_count()} cores; other processes shared the machine, "
          "so two workers can only scale as far as idle cores allow.\n")
    print(body)
    if not args.no_write:
        command = ("python benchmarks/jobs.py " + " ".join(sys.argv[1:])).strip()
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(f"# Training-job throughput: queue vs direct\n\n- Date: {date}\n"
                          f"- Machine: {machine()}\n- Command: `{command}`\n\n{body}")
        print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

"""Soak run: 64 clients for 10 minutes against a running server, with one training job throughout.

Each client holds one keep-alive HTTP/1.1 connection (a minimal asyncio client, as in
``benchmarks/serving.py``: httpx's pool would cost more CPU than the server) and sends, one after
another, requests drawn from a fixed mix:

==============================  ======  ==================================================
request                         share   body
==============================  ======  ==================================================
``POST /log_prob`` JSON         25 %    100 rows
``POST /log_prob`` safetensors  10 %    2,000 rows, binary answer
``POST /sample`` JSON           20 %    n = 100, seeded
``POST /sample`` safetensors    10 %    n = 2,000, binary answer
OIP ``infer`` log_prob, JSON    10 %    100 rows
OIP ``infer`` sample, binary    10 %    n = 500, binary outputs
``GET /models``                 15 %
==============================  ======  ==================================================

over the demo models ``two_moons`` and ``u1``, while one variational training job (an NSF on U2)
runs in the server's embedded worker for the whole run. Every answer is checked (status 200 and a
well-formed body). It reports the errors (goal: 0), p50 and p99 latency per minute, and the
server's resident memory after a warm-up and at the end (goal: within 10 %), and writes
``benchmarks/results/soak.md``.

By default it starts its own server (``nfserve serve``, with its worker) on a copy of the demo
models; ``--url`` and ``--pid`` point it at a running one instead (then the RSS is read from
``/proc/<pid>``, so run it on the server's machine).

    python benchmarks/soak.py [--clients 64] [--duration 600] [--bucket 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import markdown_table, write_result  # noqa: E402

MODELS = ("two_moons", "u1")


# ---------------------------------------------------------------------------------- requests
def _http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
          ) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _json(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _check_json(*keys: str):
    def check(headers: dict[bytes, bytes], body: bytes) -> None:
        data = orjson.loads(body)
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"answer lacks {missing}")
    return check


def _check_tensors(*names: str):
    def check(headers: dict[bytes, bytes], body: bytes) -> None:
        tensors = st_load(body)
        if any(n not in tensors for n in names):
            raise ValueError(f"safetensors answer lacks one of {names}")
    return check


def _check_oip_binary(headers: dict[bytes, bytes], body: bytes) -> None:
    size = int(headers[b"inference-header-content-length"])
    head = orjson.loads(body[:size])
    total = sum(o["parameters"]["binary_data_size"] for o in head["outputs"])
    if size + total != len(body):
        raise ValueError("binary outputs do not add up to the body")


@dataclass
class Kind:
    name: str
    weight: float
    requests: list[bytes]
    check: object


def request_mix(rng: np.random.Generator) -> list[Kind]:
    """The request kinds, each with a few prepared requests (models and inputs vary)."""
    def rows(n: int) -> np.ndarray:
        return rng.normal(size=(n, 2)).astype(np.float32)

    octet = {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}
    kinds = [
        Kind("log_prob JSON", 25, [_http("POST", "/log_prob", _json({"model": m, "x": rows(100)}),
                                         {"Content-Type": "application/json"})
                                   for m in MODELS], _check_json("log_prob")),
        Kind("log_prob binary", 10, [_http("POST", f"/log_prob?model={m}",
                                           st_save({"x": rows(2000)}), octet) for m in MODELS],
             _check_tensors("log_prob")),
        Kind("sample JSON", 20, [_http("POST", "/sample", _json({"model": m, "n": 100, "seed": s}),
                                       {"Content-Type": "application/json"})
                                 for m in MODELS for s in (0, 1)],
             _check_json("samples", "log_prob")),
        Kind("sample binary", 10, [_http("POST", f"/sample?model={m}&n=2000", b"", octet)
                                   for m in MODELS], _check_tensors("samples", "log_prob")),
        Kind("OIP infer log_prob JSON", 10, [_http(
            "POST", f"/v2/models/{m}/infer", _json({"inputs": [
                {"name": "x", "shape": [100, 2], "datatype": "FP32",
                 "data": rows(100).ravel()}]}), {"Content-Type": "application/json"})
            for m in MODELS], _check_json("outputs")),
        Kind("OIP infer sample binary", 10, [_http(
            "POST", f"/v2/models/{m}/infer", _json({"parameters": {
                "op": "sample", "n": 500, "binary_data_output": True}}),
            {"Content-Type": "application/json"}) for m in MODELS], _check_oip_binary),
        Kind("GET /models", 15, [_http("GET", "/models")], _check_json("data")),
    ]
    return kinds


# ---------------------------------------------------------------------------------- load
@dataclass
class Record:
    start: float
    # (completion time, kind, latency seconds, error or None)
    results: list[tuple[float, str, float, str | None]] = field(default_factory=list)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def client(host: str, port: int, kinds: list[Kind], stop: float, record: Record,
                 seed: int) -> None:
    """One connection sending requests of the mix until ``stop``; reconnects after an error."""
    rnd = random.Random(seed)
    weights = [k.weight for k in kinds]
    reader = writer = None
    while time.perf_counter() < stop:
        kind = rnd.choices(kinds, weights)[0]
        request = rnd.choice(kind.requests)
        t = time.perf_counter()
        error = None
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, headers, body = await _read_answer(reader)
            if status != 200:
                error = f"HTTP {status}: {body[:200].decode(errors='replace')}"
            else:
                kind.check(headers, body)
        except Exception as e:  # any failure is an error of the run, recorded with its kind
            error = f"{type(e).__name__}: {e}"[:300]
            if writer is not None:
                writer.close()
            reader = writer = None
        done = time.perf_counter()
        record.results.append((done - record.start, kind.name, done - t, error))
    if writer is not None:
        writer.close()


# ---------------------------------------------------------------------------------- server
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """``nfserve serve`` (API and embedded worker) on a copy of the demo models."""
    models = workdir / "models"
    for name in MODELS:
        shutil.copytree(ROOT / "models" / name, models / name)
    port = _free_port()
    env = {**os.environ, "NFSERVE_MODELS_DIR": str(models), "NFSERVE_DATA_DIR": str(workdir / "data"),
           "NFSERVE_PORT": str(port), "NFSERVE_EMBEDDED_WORKER": "true", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--log-level",
                             "warning"], env=env, cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError((workdir / "server.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/health/live", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def submit_job(url: str, seconds: float) -> str:
    body = {"name": "soak_u2", "flow": {"preset": "nsf", "dim": 2, "transforms": 4,
                                        "hidden": [32, 32]},
            "objective": {"kind": "variational", "target": {"builtin": "U2"}},
            "training": {"max_seconds": seconds}}
    r = httpx.post(url + "/train", json=body, timeout=30)
    r.raise_for_status()
    return r.json()["job_id"]


# ---------------------------------------------------------------------------------- report
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def soak(url: str, pid: int | None, clients: int, duration: float, bucket: float,
               warmup: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    kinds = request_mix(np.random.default_rng(0))
    rss_idle = rss_mib(pid) if pid else None
    job_id = submit_job(url, duration + warmup + 30)
    # Warm-up: load the models, fill the allocator and caches; not measured.
    warm = Record(time.perf_counter())
    await asyncio.gather(*(client(host, port, kinds, time.perf_counter() + warmup, warm, 10_000 + i)
                           for i in range(clients)))
    rss_start = rss_mib(pid) if pid else None
    load_start = os.getloadavg()
    job_states = []
    record = Record(time.perf_counter())

    async def watch_job() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.perf_counter() < record.start + duration:
                job = (await http.get(f"/jobs/{job_id}")).json()
                job_states.append((time.perf_counter() - record.start, job["status"],
                                   (job.get("progress") or {}).get("step")))
                await asyncio.sleep(min(bucket, 15))

    await asyncio.gather(watch_job(), *(client(host, port, kinds, record.start + duration,
                                               record, i) for i in range(clients)))
    rss_end = rss_mib(pid) if pid else None
    job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
    return {"record": record, "warm": warm, "rss": (rss_idle, rss_start, rss_end),
            "job": job, "job_states": job_states, "load": (load_start, os.getloadavg())}


def report(result: dict, clients: int, duration: float, bucket: float, command: str) -> str:
    record: Record = result["record"]
    rows, errors = [], {}
    buckets = int(np.ceil(duration / bucket))
    for b in range(buckets):
        part = [r for r in record.results if b * bucket <= r[0] < (b + 1) * bucket]
        ok = [r[2] for r in part if r[3] is None]
        bad = len(part) - len(ok)
        rows.append([f"{b * bucket / 60:.1f}–{min((b + 1) * bucket, duration) / 60:.1f}",
                     len(part), bad, f"{len(part) / bucket:.0f}", f"{_pct(ok, 50):.1f}",
                     f"{_pct(ok, 99):.1f}"])
    for _, kind, _, err in record.results:
        if err is not None:
            errors.setdefault((kind, err.split(":")[0]), [0, err])[0] += 1
    by_kind = []
    for name in dict.fromkeys(r[1] for r in record.results):
        lat = [r[2] for r in record.results if r[1] == name and r[3] is None]
        n = sum(1 for r in record.results if r[1] == name)
        by_kind.append([name, n, n - len(lat), f"{_pct(lat, 50):.1f}", f"{_pct(lat, 99):.1f}"])
    total = len(record.results)
    n_err = sum(1 for r in record.results if r[3] is not None)
    rss_idle, rss_start, rss_end = result["rss"]
    growth = (rss_end / rss_start - 1) * 100 if rss_start else float("nan")
    job = result["job"]
    (l1, l5, l15), (e1, e5, e15) = result["load"]
    lines = [
        f"{clients} clients for {duration / 60:g} min (after {len(result['warm'].results):,} "
        f"warm-up requests, not counted), one training job throughout.",
        "",
        f"- **Requests: {total:,}; errors: {n_err}** (goal: 0).",
        f"- **Server RSS** (API process): {rss_idle and f'{rss_idle:.0f}'} MiB idle, "
        f"{rss_start and f'{rss_start:.0f}'} MiB after the warm-up, "
        f"{rss_end and f'{rss_end:.0f}'} MiB at the end: **{growth:+.1f} %** (goal: within 10 %).",
        f"- Training job `{job['id']}`: {job['status']} at the end, step "
        f"{(job.get('progress') or {}).get('step')}; states seen: "
        f"{sorted({s for _, s, _ in result['job_states']})}.",
        f"- Load average (1, 5, 15 min): {l1:.1f}, {l5:.1f}, {l15:.1f} at the start; {e1:.1f}, "
        f"{e5:.1f}, {e15:.1f} at the end (the load generator shares the machine).",
        "",
        f"Per {bucket:g} s (latencies of successful requests, ms):",
        "",
        markdown_table(["minutes", "requests", "errors", "req/s", "p50 ms", "p99 ms"], rows),
        "",
        "Per kind of request:",
        "",
        markdown_table(["request", "count", "errors", "p50 ms", "p99 ms"], by_kind),
    ]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {kind}, {what}: {count} (e.g. `{example}`)"
                  for (kind, what), (count, example) in errors.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--bucket", type=float, default=60.0, help="seconds per report row")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds, not measured")
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="the running server's API process, for its RSS")
    parser.add_argument("--no-write", action="store_true", help="do not write soak.md")
    args = parser.parse_args()
    command = "python benchmarks/soak.py " + " ".join(sys.argv[1:])
    proc = None
    with tempfile.TemporaryDirectory(prefix="nfserve-soak-") as tmp:
        url, pid = args.url, args.pid
        if url is None:
            proc, url = start_server(Path(tmp))
            pid = proc.pid
        try:
            result = asyncio.run(soak(url, pid, args.clients, args.duration, args.bucket,
                                      args.warmup))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    body = report(result, args.clients, args.duration, args.bucket, command)
    print(body)
    if not args.no_write:
        path = write_result("soak", "Soak run: 64 clients, mixed traffic, one training job", body,
                            command)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Serving benchmark: the HTTP service next to the in-process engine, in the same run.

(a) ``/log_prob`` over 1M rows of a dim-2 and a dim-10 model, sent as JSON and as binary
    (safetensors), next to ``flow.log_prob`` in this process. Target: binary >= 90 % of in-process.
(b) 64 concurrent clients sending 100-row ``/log_prob`` requests for a fixed time, with dynamic
    batching on and off: throughput and p50/p99 latency. Target: batching >= 5x the throughput of
    no batching, with a lower p99.

Each server is a real ``uvicorn`` process (``service.api.app:create_app``) on 127.0.0.1; the clients
are ``service.client`` (httpx) in this process. Writes ``benchmarks/results/serving.md``.

    python benchmarks/serving.py [--rows 1000000] [--repeats 2] [--clients 64] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nfcore  # noqa: E402
from benchmarks._machine import cpu_model  # noqa: E402
from service.client import Client  # noqa: E402

STEP = 65536  # the server's max_batch_rows: in-process runs the same chunks as the batcher
RESULT = ROOT / "benchmarks" / "results" / "serving.md"

# (a) the same architecture at both dimensions; (b) the demo models' architecture (NSF coupling).
SCORE_SPEC = {"preset": "maf", "transforms": 5, "hidden": [64, 64]}
LOAD_SPECS = {"load_floor": {"dim": 2, "layers": [{"type": "actnorm"}]},
              "load_nsf": {"preset": "nsf", "dim": 2, "transforms": 4, "hidden": [32, 32]},
              "load_planar": {"preset": "planar", "dim": 2, "transforms": 16}}


# ---------------------------------------------------------------------------------- helpers
def machine() -> str:
    cpu = cpu_model()
    u = platform.uname()
    return (f"{cpu}, {os.cpu_count()} cores; {u.system} {u.release} {u.machine}; Python "
            f"{platform.python_version()}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn process serving ``models`` with the given settings (environment variables)."""

    def __init__(self, models: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, "NFSERVE_MODELS_DIR": str(models), "PYTHONPATH": str(ROOT),
                "NFSERVE_DATA_DIR": str(models.parent / "data"),
                "NFSERVE_EMBEDDED_WORKER": "false",
                **{f"NFSERVE_{k.upper()}": v for k, v in env.items()}}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            env=full, cwd=models.parent)

    def __enter__(self) -> Server:
        for _ in range(1200):
            if self.process.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(self.url + "/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ---------------------------------------------------------------------------------- (a)
def bench_scoring(models: Path, rows: int, repeats: int, json_repeats: int, threads: int
                  ) -> list[list]:
    table = []
    with Server(models, max_rows=str(rows), max_body_bytes=str(2**31),
                torch_threads=str(threads)) as server, \
            Client(server.url, timeout=3600) as client:
        for dim in (2, 10):
            name = f"score{dim}"
            flow = nfcore.load(models / name / "1" / "model.safetensors")
            x = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)

            def in_process(flow=flow, x=x):
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    return torch.cat([flow.log_prob(xt[i:i + STEP])
                                      for i in range(0, len(xt), STEP)]).numpy()

            want = in_process()
            client.log_prob(name, x[:1000], binary=True)  # load the model (warm cache)
            got = client.log_prob(name, x, binary=True)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            t_engine = best_time(in_process, repeats)
            t_binary = best_time(lambda n=name, x=x: client.log_prob(n, x, binary=True), repeats)
            t_json = best_time(lambda n=name, x=x: client.log_prob(n, x, binary=False),
                               json_repeats)
            for label, t in (("in-process engine", t_engine), ("HTTP binary (safetensors)",
                                                               t_binary), ("HTTP JSON", t_json)):
                table.append([f"dim {dim}", label, f"{t:.2f}", f"{rows / t:,.0f}",
                              f"{100 * t_engine / t:.0f} %"])
                print(" | ".join(table[-1]), flush=True)
    return table


# ---------------------------------------------------------------------------------- (b)
async def _http_client(port: int, request: bytes, stop: float, latencies: list[float]) -> None:
    """One keep-alive HTTP/1.1 connection sending ``request`` until ``stop`` (a wrk-like load
    generator: httpx's pool costs more CPU per request than the server at 64 connections)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = next(int(line.split(b":")[1]) for line in lines
                          if line.lower().startswith(b"content-length"))
            body = await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            latencies.append(time.perf_counter() - t)
    finally:
        writer.close()


def _request_body(model: str, rows: int) -> bytes:
    x = np.random.default_rng(1).normal(size=(rows, 2)).astype(np.float32)
    return orjson.dumps({"model": model, "x": x}, option=orjson.OPT_SERIALIZE_NUMPY)


async def _python_load(port: int, body: bytes, clients: int, duration: float
                       ) -> tuple[float, list[float]]:
    request = (f"POST /log_prob HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    warm: list[float] = []
    await asyncio.gather(*(_http_client(port, request, time.perf_counter() + 1.0, warm)
                           for _ in range(clients)))
    latencies: list[float] = []
    start = time.perf_counter()
    await asyncio.gather(*(_http_client(port, request, start + duration, latencies)
                           for _ in range(clients)))
    return time.perf_counter() - start, latencies


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("NFSERVE_BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("NFSERVE %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _wrk_load(port: int, body: bytes, clients: int, duration: float
              ) -> tuple[float, int, float, float]:
    """``wrk`` (C, one thread) as the load generator: ``(seconds, requests, p50 s, p99 s)``."""
    with tempfile.TemporaryDirectory() as tmp:
        script, data = Path(tmp) / "post.lua", Path(tmp) / "body.json"
        script.write_text(_WRK_SCRIPT)
        data.write_bytes(body)
        env = {**os.environ, "NFSERVE_BENCH_BODY": str(data)}
        url = f"http://127.0.0.1:{port}/log_prob"
        results = []
        for seconds in (1, duration):  # warm-up, then the measurement
            out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout",
                                  "30s", "-s", str(script), url], env=env, check=True,
                                 capture_output=True, text=True).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith("NFSERVE "))
            results = [int(v) for v in line.split()[1:]]
        requests, micros, p50, p99, errors = results
    if errors:
        raise RuntimeError(f"wrk saw {errors} failed requests (non-2xx or socket errors)")
    return micros / 1e6, requests, p50 / 1e6, p99 / 1e6


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _mean_batch(url: str, model: str) -> float:
    count = total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if f'model="{model}:1"' in line and line.startswith("nfserve_batch_requests_count"):
            count = float(line.split()[-1])
        if f'model="{model}:1"' in line and line.startswith("nfserve_batch_requests_sum"):
            total = float(line.split()[-1])
    return total / count if count else float("nan")


MODES = [("off", {"batching": "false"}), ("on", {"batching": "true"}),
         ("on, FastAPI route", {"batching": "true", "fast_path": "false"})]


def bench_batching(models: Path, clients: int, rows: int, duration: float, threads: int,
                   generator: str) -> list[list]:
    table = []
    for label, model in (("trivial (HTTP floor: one actnorm)", "load_floor"),
                         ("nsf (demo architecture)", "load_nsf"),
                         ("planar (iterative inverse)", "load_planar")):
        rps = {}
        body = _request_body(model, rows)
        for mode, env in MODES if model == "load_nsf" else MODES[:2]:
            with Server(models, max_queue_delay_ms="2", torch_threads=str(threads),
                        **env) as server:
                cpu0 = _cpu_seconds(server.process.pid)
                if generator == "wrk":
                    wall, served, p50, p99 = _wrk_load(server.port, body, clients, duration)
                else:
                    wall, lat = asyncio.run(_python_load(server.port, body, clients, duration))
                    served, p50, p99 = len(lat), *np.percentile(lat, [50, 99])
                cpu1 = _cpu_seconds(server.process.pid)
                mean_batch = _mean_batch(server.url, model)
            rps[mode] = served / wall
            cpu = "n/a" if cpu0 is None or cpu1 is None else f"{1e3 * (cpu1 - cpu0) / served:.2f}"
            table.append([label, mode, f"{served}", f"{rps[mode]:,.0f}",
                          f"{rps[mode] * rows:,.0f}", f"{1e3 * p50:.1f}", f"{1e3 * p99:.1f}",
                          f"{mean_batch:.1f}", cpu, f"{rps[mode] / rps['off']:.1f}x"])
            print(" | ".join(table[-1]), flush=True)
    return table


# ---------------------------------------------------------------------------------- main
def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows scored in (a)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats in (a) (best kept)")
    p.add_argument("--json-repeats", type=int, default=1)
    p.add_argument("--clients", type=int, default=64, help="concurrent clients in (b)")
    p.add_argument("--request-rows", type=int, default=100, help="rows per request in (b)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per mode in (b)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, the same for the server and in-process")
    p.add_argument("--load-generator", choices=["auto", "wrk", "python"], default="auto",
                   help="(b)'s clients: wrk (C, light on the shared cores) when it is on PATH, "
                        "else an asyncio generator in this process")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    generator = args.load_generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        torch.manual_seed(0)
        for dim in (2, 10):
            nfcore.save(nfcore.build({**SCORE_SPEC, "dim": dim}),
                        models / f"score{dim}" / "1" / "model.safetensors")
        for name, spec in LOAD_SPECS.items():
            nfcore.save(nfcore.build(spec), models / name / "1" / "model.safetensors")
        load = os.getloadavg()
        print(f"machine: {machine()}\nload average at start: {load[0]:.1f}", flush=True)
        a = [] if args.skip_a else bench_scoring(models, args.rows, args.repeats,
                                                 args.json_repeats, args.threads)
        b = [] if args.skip_b else bench_batching(models, args.clients, args.request_rows,
                                                  args.duration, args.threads, generator)
        load_end = os.getloadavg()

    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"# Serving benchmark\n\n- Date: {now}\n- Machine: {machine()}\n"
            f"- Command: `{command.strip()}`\n"
            f"- Load average (1 min) at start / end: {load[0]:.1f} / {load_end[0]:.1f}. The "
            f"machine is shared; server, clients and other users' jobs compete for its cores, "
            f"so absolute numbers are pessimistic. Each comparison is within one run.\n"]
    if a:
        body.append(f"## (a) /log_prob over {args.rows:,} rows in one request\n\n"
                    f"Model: `{ {**SCORE_SPEC, 'dim': 'D'} }`, float32. In-process: "
                    f"`flow.log_prob` under `torch.inference_mode` in 65536-row chunks (what the "
                    f"batcher runs). HTTP: `service.client.Client.log_prob` against uvicorn, "
                    f"end to end (encode, send, parse, check, score, answer, decode). Best of "
                    f"{args.repeats} (JSON: {args.json_repeats}). Target: binary >= 90 % of "
                    f"in-process. The same pass runs in two processes, so a share near or over "
                    f"100 % is within this shared machine's run-to-run noise.\n\n"
                    + md_table(["model", "path", "seconds", "rows/s", "% of in-process"], a))
    if b:
        body.append(f"## (b) {args.clients} concurrent clients, {args.request_rows}-row JSON "
                    f"/log_prob requests, {args.duration:g} s per mode\n\nModels: "
                    f"`{LOAD_SPECS['load_nsf']}` (the demo models' architecture) and "
                    f"`{LOAD_SPECS['load_planar']}` (scoring needs a root solve per layer, so a "
                    f"small batch is dominated by per-operation overhead), next to a one-layer "
                    f"flow that measures the HTTP floor. Batching: "
                    f"max_batch_rows 65536, max_queue_delay 2 ms; off: one request per forward "
                    f"pass. 'on, FastAPI route' turns the inference fast path off "
                    f"(`NFSERVE_FAST_PATH=false`): the same handlers behind FastAPI's router and middleware. Clients: "
                    f"{args.clients} keep-alive HTTP/1.1 connections of "
                    + ("`wrk -t1` (one C thread, so the shared cores go to the server)"
                       if generator == "wrk" else "a minimal asyncio load generator in this "
                       "process (httpx's connection pool would be the bottleneck)")
                    + ". Target: >= 5x throughput with a lower p99.\n\n"
                    + md_table(["model", "batching", "requests", "requests/s", "rows/s",
                                "p50 ms", "p99 ms", "requests per pass",
                                "server CPU ms per request", "vs off"], b))
    verdicts = []
    for row in a:
        if row[1].startswith("HTTP binary"):
            pct = float(row[4].rstrip(" %"))
            verdicts.append(f"- (a) {row[0]}: binary end to end at {pct:.0f} % of in-process: "
                            f"{'met' if pct >= 90 else 'NOT met'} (target 90 %).")
    for off, on in ((r, o) for r in b for o in b if r[0] == o[0] and (r[1], o[1]) == ("off", "on")):
        if on[0].startswith("trivial"):
            continue  # the floor, not a target
        speedup = float(on[-1].rstrip("x"))
        lower_p99 = float(on[6]) < float(off[6])
        verdicts.append(f"- (b) {on[0]}: batching gives {speedup:.1f}x the throughput, p99 "
                        f"{on[6]} ms vs {off[6]} ms: "
                        f"{'met' if speedup >= 5 and lower_p99 else 'NOT met'} (target 5x, lower "
                        f"p99).")
    if verdicts:
        body.append("## Against the targets\n\n" + "\n".join(verdicts) + "\n\n"
                    "\"requests per pass\" is the mean number of requests a forward pass served "
                    "(from `nfserve_batch_requests`); \"server CPU\" is the server process's "
                    "user+system CPU time over the run divided by the requests served. With "
                    "batching on, throughput is bounded by the per-request HTTP work on the event "
                    "loop (the trivial model's CPU per request); the speed-up over no batching "
                    "is at most the ratio of a 100-row forward pass plus that HTTP work to the "
                    "HTTP work plus the batched pass's share per request.")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text("\n\n".join(body) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

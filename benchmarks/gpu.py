"""Device benchmark: log_prob and sampling rows/s on one device, eager, CUDA-graphed and compiled,
next to zuko's same architecture on the same device.

For each preset (nsf, maf, realnvp; 5 transforms, hidden [64, 64], float32) and dim (2, 10), at
batch sizes from 1 k to 10 M rows, under ``torch.inference_mode``:

- *eager*: ``flow.log_prob(x)`` and ``flow.sample_and_log_prob(n)`` as the service runs them;
- *graph*: the same pass captured once per batch size in a CUDA graph and replayed (a served
  batch has a fixed maximum shape, so the batcher's passes could replay one; CUDA only);
- *compiled*: ``torch.compile`` of the pass (``dynamic=True``: one compile serves every size;
  sampling pushes noise drawn outside the compiled function), its compile time reported apart;
- *zuko*: ``NSF(passes=2)``, ``MAF``, ``RealNVP``: ``log_prob`` and ``rsample_and_log_prob``.

A cell is the best of several timed calls after a warm-up, each ended by a device synchronize.
The goal of issue 17: at least 100 M rows/s for nsf's log_prob at dim 2 on one H100/H200.

    python benchmarks/gpu.py --device cuda            # writes benchmarks/results/gpu_cuda.md
    python benchmarks/gpu.py --device cpu --tiny      # a few seconds: keeps this script working
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfcore  # noqa: E402
from benchmarks._machine import machine, markdown_table, write_result  # noqa: E402

BATCHES = [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
PRESETS = ["nsf", "maf", "realnvp"]
DIMS = [2, 10]
GOAL = 100e6  # rows/s, nsf log_prob at dim 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rows_per_second(fn: Callable[[], object], rows: int, device: torch.device,
                    budget_s: float) -> float:
    """Best rate over calls of ``fn`` (after one warm-up) within about ``budget_s`` seconds: at
    least 3 calls, unless they would take more than 10 budgets (a pass that has fallen off a
    cliff, as a triangular solve of 600,000 rows once did on an H200, is reported from fewer
    calls rather than holding the run for minutes)."""
    fn()
    sync(device)
    best, spent, calls = math.inf, 0.0, 0
    while (calls < 3 and spent < 10 * budget_s) or (spent < budget_s and calls < 50):
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    return rows / max(best, 1e-12)


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph (its inputs are fixed tensors), or None off CUDA or when
    the pass cannot be captured (a host synchronization inside it)."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return graph.replay


def nfcore_flow(preset: str, dim: int, tiny: bool, device: torch.device) -> nfcore.Flow:
    torch.manual_seed(0)
    hidden, transforms = ([8], 1) if tiny else ([64, 64], 5)
    return nfcore.build({"preset": preset, "dim": dim, "transforms": transforms,
                         "hidden": hidden}).to(device)


def zuko_flow(preset: str, dim: int, tiny: bool, device: torch.device):
    try:
        import zuko
    except ImportError:
        return None
    hidden, transforms = ([8], 1) if tiny else ([64, 64], 5)
    kw = {"transforms": transforms, "hidden_features": hidden}
    torch.manual_seed(0)
    flow = {"nsf": lambda: zuko.flows.NSF(dim, passes=2, **kw),
            "maf": lambda: zuko.flows.MAF(dim, **kw),
            "realnvp": lambda: zuko.flows.RealNVP(dim, **kw)}[preset]()
    return flow.to(device)


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:,.3g}"


def measure(preset: str, dim: int, batches: list[int], device: torch.device, args
            ) -> tuple[list[list], str]:
    """Rows of the table for one preset and dim, and a note on the compile time."""
    flow = nfcore_flow(preset, dim, args.tiny, device)
    zflow = zuko_flow(preset, dim, args.tiny, device) if not args.no_zuko else None
    note = ""
    compiled_lp = compiled_sp = None
    if not args.no_compile:
        compiled_lp = torch.compile(lambda v: flow._log_prob(v, None), dynamic=True)
        compiled_sp = torch.compile(lambda v: flow._sample_from_noise(v, None), dynamic=True)
    rows = []
    compile_s = 0.0
    with torch.inference_mode():
        for n in batches:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(n, dim, generator=gen, device=device)
            budget = args.budget
            lp = rows_per_second(lambda x=x: flow.log_prob(x), n, device, budget)
            sp = rows_per_second(lambda n=n: flow.sample_and_log_prob(n), n, device, budget)
            g_lp = graphed(lambda x=x: flow.log_prob(x), device)
            g_sp = graphed(lambda n=n: flow.sample_and_log_prob(n), device)
            glp = None if g_lp is None else rows_per_second(g_lp, n, device, budget)
            gsp = None if g_sp is None else rows_per_second(g_sp, n, device, budget)
            clp = csp = None
            if compiled_lp is not None:
                t0 = time.perf_counter()
                compiled_lp(x)
                compiled_sp(x)
                sync(device)
                compile_s += time.perf_counter() - t0
                clp = rows_per_second(lambda x=x: compiled_lp(x), n, device, budget)
                csp = rows_per_second(lambda x=x: compiled_sp(x), n, device, budget)
            zlp = zsp = None
            if zflow is not None:
                dist = zflow()
                zlp = rows_per_second(lambda x=x, d=dist: d.log_prob(x), n, device, budget)
                zsp = rows_per_second(lambda n=n, d=dist: d.rsample_and_log_prob((n,)), n,
                                      device, budget)
            best = max(v for v in (lp, glp, clp) if v is not None)
            row = [preset, dim, f"{n:,}", fmt(lp), fmt(glp), fmt(clp), fmt(zlp),
                   "—" if zlp is None else f"{best / zlp:.2f}×",
                   fmt(sp), fmt(gsp), fmt(csp), fmt(zsp)]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if compiled_lp is not None:
        note = f"{preset} dim {dim}: compiling took {compile_s:.0f} s in all (first call per size)"
    return rows, note


HEADERS = ["preset", "dim", "batch", "log_prob eager", "graph", "compiled", "zuko",
           "best vs zuko", "sample eager", "graph", "compiled", "zuko"]


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run: nsf at dim 2, 1 transform, hidden [8], 100 and 1,000 "
                             "rows; writes no result file unless --out is given")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--presets", nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per cell")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-zuko", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    parser.add_argument("--out", default=None, help="result file name (benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets or (["nsf"] if args.tiny else PRESETS)
    dims = args.dims or ([2] if args.tiny else DIMS)
    batches = args.batches or ([100, 1_000] if args.tiny else BATCHES)
    if args.tiny:
        args.budget = min(args.budget, 0.05)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"device: {device} ({name})", flush=True)
    rows, notes = [], []
    for preset in presets:
        for dim in dims:
            r, note = measure(preset, dim, batches, device, args)
            rows += r
            notes += [note] if note else []
    nsf2 = [r for r in rows if r[0] == "nsf" and r[1] == 2]
    body = (
        f"Device: {device} ({name}). Rows/s, float32, `torch.inference_mode`, best of several "
        f"calls after a warm-up (each ended by a device synchronize). "
        f"{'Tiny smoke run. ' if args.tiny else ''}"
        "*graph*: the pass captured in a CUDA graph per batch size (— off CUDA, or where the "
        "pass cannot be captured); *compiled*: `torch.compile(dynamic=True)`; *best vs zuko*: "
        "the best of eager, graph and compiled over zuko's log_prob.\n\n"
        + markdown_table(HEADERS, rows)
        + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    )
    if nsf2 and not args.tiny:
        top = max(float(c.replace(",", "")) for r in nsf2 for c in r[3:6] if c != "—")
        body += (f"\n\n**Goal (nsf log_prob at dim 2 ≥ 100 M rows/s on one H100/H200):** best "
                 f"{top:,.3g} rows/s, {'met' if top >= GOAL else 'not met'}.")
    out = args.out or (None if args.tiny else f"gpu_{device.type}")
    if out:
        cmd = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_result(out, f"Inference on {device.type}: nfcore vs zuko", body, cmd)
        print(f"wrote {path}")
    else:
        print(body)
    return rows


if __name__ == "__main__":
    main()

"""Roofline benchmark: each preset's inference rate as a share of this machine's skinny-GEMM rate.

The limit any implementation of these architectures meets on a CPU is the rate of its
conditioners' dense layers. This script measures, in one process, the rate of one
``(rows x 64) @ (64 x 64)`` float32 matmul (FLOP/s), then for every preset at dim 2, 10 and 50
(5 transforms, hidden [64, 64], float32, ``torch.inference_mode``) the rows/s of ``log_prob`` and
of ``sample_and_log_prob``, and their *share* of that rate:

    share = (dense FLOPs per row of one pass through every conditioner) x rows/s / GEMM FLOP/s.

Beside them: the same flow on its plain eager kernels (``flow.fast_inference = False``, the path
before the lean one) and zuko's same architecture where zuko has one (``NSF(passes=2)`` for nsf,
``NSF`` for nsf_ar, ``MAF`` for maf, ``RealNVP`` for realnvp). Then, at dim 10, what each option
of the inference path gives (row blocks of several sizes, lean kernels, ``torch.compile`` with
``--compile``) and, for the presets under 80 % of the roofline, a ``torch.profiler`` summary.

The machine is shared, so absolute rates move with the load: every figure is the least
CPU time of the process (one thread: the time it computed, not the time it waited for a core)
over ``--repeats`` calls after a warm-up, the GEMM rate is re-measured around each preset and the
share uses the best GEMM rate seen next to it. Read ratios, not absolutes.

    python benchmarks/roofline.py [--rows 100000] [--threads 1] [--compile] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfcore  # noqa: E402
from benchmarks._machine import machine, markdown_table, write_result  # noqa: E402

HIDDEN = [64, 64]
TRANSFORMS = 5
GOAL_SHARE = 0.8
GOAL_ZUKO_SPLINE = 1.5
SPLINES = ("nsf", "nsf_ar")
#: A pass is first called on the smallest of ``PROBES`` rows, then on the next size, while a call
#: takes at most ``SLOW_S``; one slower than that is measured at the size it took it (sequential
#: directions at dim 50, ODE solves): marked * in the tables, with the rows. The ladder starts
#: small because zuko's autoregressive NSF samples at dim 50 with ~0.6 MB a row and 10 ms a row
#: (measured): 100,000 rows at once were killed for memory.
PROBES = (1_000, 10_000)
SLOW_S = 0.5


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The least CPU time of this process over ``repeats`` calls after a warm-up. CPU time, not
    wall time: on a shared machine the wall clock also counts the time spent waiting for a core,
    which hits a long pass far more than a short matmul, and would bias every share."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return max(min(times), 1e-9)


def gemm_rate(rows: int, repeats: int) -> float:
    """FLOP/s of ``(rows x 64) @ (64 x 64)`` in float32, as a flow's hidden layer computes it."""
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(rows, 64, generator=gen), torch.randn(64, 64, generator=gen)
    return 2.0 * rows * 64 * 64 / best_time(lambda: a @ w, max(repeats, 3))


def dense_flops(module: nn.Module) -> int:
    """Multiply-add FLOPs per row of one pass through every dense layer of ``module``."""
    return sum(2 * m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))


def rate(make: Callable[[int], Callable[[], object]], rows: int, repeats: int
         ) -> tuple[float, int | None]:
    """Rows/s of ``make(n)()`` (a pass over ``n`` rows), and the probe size used when it is less
    than ``rows`` (else None)."""
    for n in (*(p for p in PROBES if p < rows), rows):
        probe = make(n)
        t0 = time.process_time()
        probe()
        if n == rows or time.process_time() - t0 > SLOW_S:
            break
    return n / best_time(probe, max(1, repeats // 2) if n < rows else repeats), (
        n if n < rows else None)


def nfcore_flow(preset: str, dim: int) -> nfcore.Flow:
    torch.manual_seed(0)
    spec = {"preset": preset, "dim": dim}
    layer = nfcore.PRESETS[preset][0]
    # planar and radial have a hidden network only when conditional (their context network)
    if "hidden" in nfcore.LAYER_TYPES[layer] and layer not in ("planar", "radial"):
        spec["hidden"] = HIDDEN
    if preset != "cnf":  # one continuous-time layer; its depth is the field's
        spec["transforms"] = TRANSFORMS
    return nfcore.build(spec)


def zuko_flow(preset: str, dim: int):
    try:
        import zuko
    except ImportError:
        return None
    kw = {"transforms": TRANSFORMS, "hidden_features": HIDDEN}
    makers = {"nsf": lambda: zuko.flows.NSF(dim, passes=2, **kw),
              "nsf_ar": lambda: zuko.flows.NSF(dim, **kw),
              "maf": lambda: zuko.flows.MAF(dim, **kw),
              "realnvp": lambda: zuko.flows.RealNVP(dim, **kw)}
    if preset not in makers or (preset == "realnvp" and dim < 2):
        return None
    torch.manual_seed(0)
    return makers[preset]()


def measure_nfcore(flow: nfcore.Flow, rows: int, repeats: int) -> tuple[tuple, tuple]:
    with torch.inference_mode():
        x = flow.sample(rows, generator=torch.Generator().manual_seed(0))
        lp = rate(lambda n: lambda: flow.log_prob(x[:n]), rows, repeats)
        sp = rate(lambda n: lambda: flow.sample_and_log_prob(n), rows, repeats)
    return lp, sp


def measure_zuko(flow, rows: int, repeats: int) -> tuple[tuple, tuple]:
    with torch.inference_mode():
        dist = flow()
        # Scoring speed does not depend on where the points are: no need for zuko's own samples,
        # whose autoregressive sampler is the slow, memory-hungry direction at high dim.
        x = torch.randn(rows, dist.event_shape[0], generator=torch.Generator().manual_seed(0))
        lp = rate(lambda n: lambda: dist.log_prob(x[:n]), rows, repeats)
        sp = rate(lambda n: lambda: dist.rsample_and_log_prob((n,)), rows, repeats)
    return lp, sp


def cell(r: tuple[float, int | None] | None) -> str:
    if r is None:
        return "—"
    return f"{r[0]:,.3g}" + (f"* ({r[1]:,} rows)" if r[1] else "")


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def ratio(a: tuple | None, b: tuple | None) -> str:
    return "—" if a is None or b is None else f"{a[0] / b[0]:.2f}×"


HEADERS = ["preset", "dense FLOPs/row", "log_prob rows/s", "share", "eager", "zuko", "vs zuko",
           "sample rows/s", "share", "eager", "zuko", "vs zuko"]


def preset_row(preset: str, dim: int, rows: int, repeats: int, with_eager: bool
               ) -> tuple[list, dict]:
    flow = nfcore_flow(preset, dim)
    flops = dense_flops(flow)
    g0 = gemm_rate(rows, repeats)
    lp, sp = measure_nfcore(flow, rows, repeats)
    elp = esp = None
    if with_eager:
        flow.fast_inference = False
        elp, esp = measure_nfcore(flow, rows, repeats)
        flow.fast_inference = True
    zflow = zuko_flow(preset, dim)
    zlp, zsp = measure_zuko(zflow, rows, repeats) if zflow is not None else (None, None)
    gemm = max(g0, gemm_rate(rows, repeats))
    share_lp = flops * lp[0] / gemm if flops else None
    share_sp = flops * sp[0] / gemm if flops else None
    row = [preset, f"{flops:,}" if flops else "0", cell(lp), pct(share_lp), cell(elp), cell(zlp),
           ratio(lp, zlp), cell(sp), pct(share_sp), cell(esp), cell(zsp), ratio(sp, zsp)]
    facts = {"preset": preset, "dim": dim, "share_lp": share_lp, "vs_zuko_lp":
             None if zlp is None else lp[0] / zlp[0], "gemm": gemm, "flops": flops,
             "cost": flow.cost, "lp": lp[0]}
    return row, facts


# ---------------------------------------------------------------- the options, at dim 10
def option_rows(presets: list[str], rows: int, repeats: int, compile_: bool) -> list[list]:
    """log_prob rows/s of each option of the inference path, as a ratio to the eager path."""
    out = []
    for preset in presets:
        flow = nfcore_flow(preset, 10)
        with torch.inference_mode():
            x = flow.sample(rows, generator=torch.Generator().manual_seed(0))

            def lp(flow=flow, x=x):
                return rows / best_time(lambda: flow.log_prob(x), repeats)

            flow.fast_inference = False
            eager = lp()
            flow.fast_inference = True
            results = {}
            flow.block_rows = rows  # lean kernels, one block
            results["lean kernels, one block"] = lp()
            for block in (1024, 4096, 16384):
                flow.block_rows = block
                results[f"lean + blocks of {block}"] = lp()
            flow.block_rows = nfcore.Flow.block_rows
            if compile_:
                results["torch.compile (inductor), blocks"] = compiled_rate(flow, x, repeats)
        cells = []
        for v in results.values():
            v, note = (v[0], f"; compiled in {v[1]:.0f} s") if isinstance(v, tuple) else (v, "")
            cells.append(f"{v:,.3g} ({v / eager:.2f}×{note})")
        out.append([preset, f"{eager:,.3g}"] + cells)
        headers = ["preset", "eager"] + list(results)
    return [headers] + out if out else []


def compiled_rate(flow: nfcore.Flow, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """``torch.compile`` of the whole log_prob pass on fixed blocks (compile time included in the
    cell's note); blocks so that one compiled shape serves every batch."""
    block = flow.block_rows
    fn = torch.compile(lambda v: flow._log_prob(v, None), dynamic=False)
    t0 = time.perf_counter()
    fn(x[:block])
    compile_s = time.perf_counter() - t0
    n = x.shape[0] - x.shape[0] % block

    def run():
        for i in range(0, n, block):
            fn(x[i : i + block])

    v = n / best_time(run, repeats)
    return v, compile_s


def profile_summary(preset: str, rows: int) -> list[list]:
    """The top operators of one ``log_prob`` pass at dim 10 by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    flow = nfcore_flow(preset, 10)
    with torch.inference_mode():
        x = flow.sample(rows, generator=torch.Generator().manual_seed(0))
        flow.log_prob(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            flow.log_prob(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = [[e.key, e.count, f"{100 * e.self_cpu_time_total / total:.0f} %"] for e in events[:8]]
    dense = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))
    return top, dense / total


def conditioner_rows(presets: list[str], rows: int, repeats: int) -> list[list]:
    """The conditioners' MLPs alone (dense layers, bias adds, activations; no element-wise map,
    no other layer) at dim 10, on one block of rows: the share that the dense layers themselves
    reach, and their part of the whole log_prob pass. The input and output layers are narrow
    (5 or 10 features in, 10 to 115 out), and a narrow matmul runs well below the 64 x 64 rate."""
    out = []
    for preset in presets:
        flow = nfcore_flow(preset, 10)
        nets = [m for m in flow.modules()
                if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Linear)]
        if not nets:
            continue
        flops = dense_flops(flow)
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            ins = [torch.randn(rows, net[0].in_features, generator=gen) for net in nets]
            x = flow.sample(rows, generator=gen)
            gemm = gemm_rate(rows, repeats)
            alone = best_time(lambda nets=nets, ins=ins: [net(h) for net, h in zip(
                nets, ins, strict=True)], repeats)
            whole = best_time(lambda flow=flow, x=x: flow.log_prob(x), repeats)
            gemm = max(gemm, gemm_rate(rows, repeats))
        out.append([preset, f"{flops * rows / alone / gemm:.0%}",
                    f"{flops * rows / whole / gemm:.0%}", f"{alone / whole:.0%}"])
    return out


CONDITIONER_HEADERS = ["preset", "conditioners alone: share", "whole log_prob: share",
                       "conditioners' part of the pass"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--presets", nargs="+", default=sorted(nfcore.PRESETS))
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the log_prob pass (minutes to compile)")
    parser.add_argument("--eager-dims", type=int, nargs="*", default=None,
                        help="dims that get the eager columns (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="10,000 rows, dims 2 and 10, one repeat: a smoke run")
    parser.add_argument("--out", default="roofline", help="result file name (benchmarks/results)")
    parser.add_argument("--conditioners", action="store_true",
                        help="only the conditioners-alone table (dim 10, 8,192 rows, 20 repeats)")
    args = parser.parse_args()
    if args.conditioners:
        torch.set_num_threads(args.threads)
        table = markdown_table(CONDITIONER_HEADERS, conditioner_rows(
            [p for p in args.presets if p in ("realnvp", "maf", "nsf", "nsf_ar", "iaf")],
            8192, 20))
        print(table)
        return
    if args.quick:
        args.rows, args.repeats, args.dims = 10_000, 1, [d for d in args.dims if d <= 10]
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"machine: {machine()}; load {load0[0]:.1f}", flush=True)

    sections, facts = [], []
    for dim in args.dims:
        rows = []
        for preset in args.presets:
            if preset in ("realnvp", "nsf") and dim < 2:
                continue
            eager = args.eager_dims is None or dim in args.eager_dims
            row, fact = preset_row(preset, dim, args.rows, args.repeats, eager)
            rows.append(row)
            facts.append(fact)
            print(f"dim {dim}: " + " | ".join(map(str, row)), flush=True)
        gemm = max(f["gemm"] for f in facts if f["dim"] == dim)
        sections.append(f"## dim {dim}\n\nGEMM rate next to these rows: up to "
                        f"{gemm / 1e9:.1f} GFLOP/s.\n\n" + markdown_table(HEADERS, rows))

    at10 = [f for f in facts if f["dim"] == 10]
    one_pass = [f for f in at10 if f["flops"] and f["cost"]["log_prob"] == "one pass"
                and f["preset"] not in ("resflow",)]
    opts = option_rows([p for p in ("nsf", "nsf_ar", "maf", "realnvp") if p in args.presets],
                       args.rows, args.repeats, args.compile) if 10 in args.dims else []
    conditioners = (conditioner_rows([f["preset"] for f in one_pass], 8192, 10 * args.repeats)
                    if one_pass else [])
    profiles = []
    for f in one_pass:
        if f["share_lp"] is not None and f["share_lp"] < GOAL_SHARE:
            top, dense = profile_summary(f["preset"], min(args.rows, 20_000))
            profiles.append(f"### {f['preset']} (dim 10): {100 * f['share_lp']:.0f} % of the "
                            f"roofline; dense layers take {100 * dense:.0f} % of the pass\n\n"
                            + markdown_table(["operator", "calls", "self CPU"], top))
    load1 = os.getloadavg()

    met = [f for f in one_pass if f["share_lp"] is not None and f["share_lp"] >= GOAL_SHARE]
    spline = [f for f in at10 if f["preset"] in SPLINES and f["vs_zuko_lp"] is not None]
    body = (
        f"{args.rows:,} rows, {TRANSFORMS} transforms, hidden {HIDDEN}, float32, "
        f"`torch.inference_mode`, **{args.threads} torch thread(s)**; the least CPU time of the "
        f"process over {args.repeats} calls after a warm-up (CPU time: the wall clock of a shared "
        f"machine also counts the wait for a core). Load average {load0[0]:.1f} at the start, "
        f"{load1[0]:.1f} at the end, on a machine shared with other jobs: the absolute rates move "
        "with it, the ratios (share, vs zuko, vs eager) much less.\n\n"
        "- *share*: conditioners' dense FLOPs per row (one pass through every dense layer) × "
        "rows/s ÷ the rate of a `(rows × 64) @ (64 × 64)` matmul measured next to it. For a "
        "sequential direction (iaf log_prob, maf and nsf_ar sampling: one pass per feature) and "
        "for solver-based presets (resflow, cnf, planar, sylvester) the share is of that one-pass "
        "bound, which they cannot reach by construction.\n"
        "- *eager*: the same flow on the plain kernels (`fast_inference = False`), the path "
        "before the lean one.\n"
        "- *: measured on the rows given (a first call over that many rows took more than "
        f"{SLOW_S} s).\n\n"
        f"**Goal: share ≥ 80 % for log_prob at dim 10** (one-pass presets with a conditioner): "
        f"met by {', '.join(f['preset'] for f in met) or 'none'} of "
        f"{', '.join(f['preset'] for f in one_pass)}.\n"
        f"**Goal: spline presets ≥ 1.5× zuko (log_prob, dim 10):** "
        + ", ".join(f"{f['preset']} {f['vs_zuko_lp']:.2f}×" for f in spline) + ".\n\n"
        + "\n\n".join(sections)
    )
    if opts:
        body += ("\n\n## What each option of the inference path gives (log_prob, dim 10)\n\n"
                 "Rows/s and the ratio to the eager path, same run.\n\n"
                 + markdown_table(opts[0], opts[1:]))
    if conditioners:
        body += ("\n\n## The conditioners alone (dim 10, 8,192 rows)\n\nThe conditioners' "
                 "MLPs by themselves (dense layers, bias adds, activations), with no element-wise "
                 "map and no other layer: the share the dense layers reach on their own, beside "
                 "the whole pass's. The narrow input and output layers (5 or 10 features in, 10 to "
                 "115 out) run well below the 64 × 64 rate, so this, not 100 %, is the ceiling of "
                 "an implementation that calls the library's matmul.\n\n"
                 + markdown_table(CONDITIONER_HEADERS, conditioners))
    if profiles:
        body += ("\n\n## Where the time goes below 80 % (torch.profiler, one log_prob pass, "
                 f"{min(args.rows, 20_000):,} rows, dim 10)\n\n" + "\n\n".join(profiles))
    command = (f"python benchmarks/roofline.py --rows {args.rows} --repeats {args.repeats} "
               f"--threads {args.threads} --dims {' '.join(map(str, args.dims))}"
               + ("" if args.eager_dims is None
                  else f" --eager-dims {' '.join(map(str, args.eager_dims))}")
               + (" --compile" if args.compile else ""))
    path = write_result(args.out, "Roofline: inference rate as a share of the skinny-GEMM rate",
                        body, command)
    print(body)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

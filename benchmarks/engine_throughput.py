"""Engine throughput: log_prob and sample_and_log_prob rows/s, nfcore next to zuko, same run.

Presets nsf (coupling), maf and realnvp at dim 2 and 10, 5 transforms, hidden [64, 64], batch
100 000, float32, inference mode. zuko's same architectures: NSF(passes=2) (coupling), MAF,
RealNVP. Also the sampling-fast presets (nfcore nsf coupling and iaf) against zuko's autoregressive
NSF at dim 10, the target being at least 50x.

    python benchmarks/engine_throughput.py [--batch 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfcore  # noqa: E402
from benchmarks._machine import machine, markdown_table, write_result  # noqa: E402

HIDDEN = [64, 64]
TRANSFORMS = 5


def rows_per_second(fn, rows: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return rows / statistics.median(times)


def nfcore_flow(preset: str, dim: int) -> nfcore.Flow:
    torch.manual_seed(0)
    return nfcore.build({"preset": preset, "dim": dim, "transforms": TRANSFORMS, "hidden": HIDDEN})


def zuko_flow(kind: str, dim: int):
    import zuko

    torch.manual_seed(0)
    kw = {"transforms": TRANSFORMS, "hidden_features": HIDDEN}
    if kind == "nsf":
        return zuko.flows.NSF(dim, passes=2, **kw)
    if kind == "nsf_autoregressive":
        return zuko.flows.NSF(dim, **kw)
    if kind == "maf":
        return zuko.flows.MAF(dim, **kw)
    if kind == "realnvp":
        return zuko.flows.RealNVP(dim, **kw)
    raise ValueError(kind)


def measure_nfcore(flow: nfcore.Flow, batch: int, repeats: int) -> tuple[float, float]:
    x = flow.sample(batch, generator=torch.Generator().manual_seed(0)).detach()
    with torch.inference_mode():
        lp = rows_per_second(lambda: flow.log_prob(x), batch, repeats)
        sp = rows_per_second(lambda: flow.sample_and_log_prob(batch), batch, repeats)
    return lp, sp


def measure_zuko(flow, batch: int, repeats: int, sample_repeats: int | None = None):
    with torch.inference_mode():
        dist = flow()
        x = dist.sample((batch,))
        lp = rows_per_second(lambda: dist.log_prob(x), batch, repeats)
        sp = rows_per_second(lambda: dist.rsample_and_log_prob((batch,)), batch,
                             sample_repeats or repeats)
    return lp, sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch, repeats = args.batch, args.repeats
    print(f"machine: {machine()}")

    rows = []
    for preset in ("nsf", "maf", "realnvp"):
        for dim in (2, 10):
            ours = measure_nfcore(nfcore_flow(preset, dim), batch, repeats)
            theirs = measure_zuko(zuko_flow(preset, dim), batch, repeats)
            row = [preset, dim, ours[0], theirs[0], ours[0] / theirs[0],
                   ours[1], theirs[1], ours[1] / theirs[1]]
            rows.append(row)
            print(markdown_table(HEADERS, [row]).splitlines()[-1], flush=True)

    # Sampling-fast presets against zuko's autoregressive NSF at dim 10 (its sampler inverts
    # the autoregression one feature at a time).
    zuko_ar = measure_zuko(zuko_flow("nsf_autoregressive", 10), batch, 1, sample_repeats=1)
    fast = []
    for preset in ("nsf", "iaf"):
        ours = measure_nfcore(nfcore_flow(preset, 10), batch, repeats)
        fast.append([preset, 10, ours[1], zuko_ar[1], ours[1] / zuko_ar[1]])
    fast.append(["(zuko NSF autoregressive log_prob)", 10, zuko_ar[0], "", ""])

    body = (
        f"Batch {batch:,} rows, {TRANSFORMS} transforms, hidden {HIDDEN}, float32, "
        f"`torch.inference_mode`, median of {repeats} runs after a warm-up. Rows/s; ratio = "
        "nfcore / zuko (above 1 means nfcore is faster).\n\n"
        "## nfcore presets next to zuko's same architecture\n\n"
        "zuko: `NSF(passes=2)` (coupling) for `nsf`, `MAF` for `maf`, `RealNVP` for `realnvp`.\n\n"
        + markdown_table(HEADERS, rows)
        + "\n\n## Sampling-fast presets against zuko's autoregressive NSF (dim 10)\n\n"
        + markdown_table(["nfcore preset", "dim", "nfcore sample rows/s",
                          "zuko NSF (autoregressive) sample rows/s", "ratio"], fast)
    )
    print()
    print(body)
    path = write_result("engine_throughput", "Engine throughput: nfcore vs zuko", body,
                        f"python benchmarks/engine_throughput.py --batch {batch} --repeats {repeats}")
    print(f"\nwrote {path}")


HEADERS = ["preset", "dim", "nfcore log_prob", "zuko log_prob", "ratio",
           "nfcore sample", "zuko sample", "ratio"]

if __name__ == "__main__":
    main()

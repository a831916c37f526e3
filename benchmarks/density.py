"""Density estimation on real data: held-out mean log-likelihood, nfcore next to zuko's NSF.

For every ``shared/data/*.npy`` set and each of ``--splits`` random splits (seeds 0, 1, ...):
shuffle, fit on 80 % and report the mean log-likelihood of the other 20 % in nats, in the data's
own units. The split's seed also seeds both fits (initialization, validation rows, batch order).
Both libraries get the same protocol and budget: 10 % of the training rows for validation (the
same rows), early stopping with best-weight restore (``--patience`` checks, default 50), batch
256, AdamW, linear warm-up then cosine decay, gradient clipping at 5, at most ``--steps`` steps and
``--max-seconds`` of wall clock. zuko's flow sees standardized data and its log-likelihood is
corrected by the scale's log-determinant, as nfcore's ``standardize`` layer does internally.
nfcore's ``fit_density`` also sets its spline layers' knots from the training data before the first
step (``Flow.initialize``); ``--no-init-knots`` turns that off, to measure what it brings.

Fits run in ``--jobs`` worker processes of one torch thread each.

    python benchmarks/density.py [--data /work/shared/data] [--splits 3] [--jobs 2]

Writes ``benchmarks/results/density.md``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfcore  # noqa: E402
from benchmarks._machine import markdown_table, write_result  # noqa: E402
from nfcore.train.density import split  # noqa: E402
from nfcore.train.loop import generator, learning_rate  # noqa: E402


def fit_nfcore(spec: dict, train: np.ndarray, args) -> tuple[nfcore.Flow, dict]:
    torch.manual_seed(args.seed)
    flow = nfcore.build(spec)
    result = nfcore.fit_density(flow, train, steps=args.steps, batch_size=args.batch, lr=args.lr,
                                max_seconds=args.max_seconds, seed=args.seed,
                                patience=args.patience, init_knots=args.init_knots)
    return flow, result.summary


def fit_zuko(train: np.ndarray, args) -> tuple[object, torch.Tensor, torch.Tensor, dict]:
    """zuko NSF with nfcore's protocol written out: same split, schedule, clipping, early stop."""
    import zuko

    x = torch.as_tensor(train, dtype=torch.float32)
    tr_idx, val_idx = split(x.shape[0], 0.1, args.seed)
    x_tr, x_val = x[tr_idx], x[val_idx]
    loc, scale = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    x_tr, x_val = (x_tr - loc) / scale, (x_val - loc) / scale
    torch.manual_seed(args.seed)
    flow = zuko.flows.NSF(x.shape[1], transforms=args.transforms, hidden_features=args.hidden,
                          bins=args.bins)
    params = list(flow.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n = x_tr.shape[0]
    batch = min(args.batch, n)
    per_epoch = math.ceil(n / batch)
    every = min(max(per_epoch, 20), 100)
    best, best_state, bad, step = math.inf, None, 0, 0
    start = time.monotonic()
    perm = None
    while step < args.steps and time.monotonic() - start < args.max_seconds and bad < args.patience:
        epoch, i = divmod(step, per_epoch)
        if i == 0 or perm is None:
            perm = torch.randperm(n, generator=generator(args.seed, 1, epoch))
        loss = -flow().log_prob(x_tr[perm[i * batch : (i + 1) * batch]]).mean()
        lr = learning_rate(step, args.steps, args.lr, elapsed=time.monotonic() - start,
                           max_seconds=args.max_seconds)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 5.0)):
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
        step += 1
        if step % every == 0 or step >= args.steps:
            with torch.no_grad():
                val = float(-flow().log_prob(x_val).mean())
            if val < best:
                best, bad = val, 0
                best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
            else:
                bad += 1
    if best_state is not None:
        flow.load_state_dict(best_state)
    stats = {"steps": step, "duration_s": time.monotonic() - start,
             "val_loss": best + float(torch.log(scale).sum())}
    return flow, loc, scale, stats


def _mean_sd(values: np.ndarray) -> str:
    """``mean ± sd`` over the splits (the mean alone for one split)."""
    return f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else "")


def run_one(task: tuple) -> dict:
    """Fit one library on one split of one set; return its held-out mean log-likelihood."""
    path, split_seed, lib, args = task
    torch.set_num_threads(args.threads)
    args = argparse.Namespace(**{**vars(args), "seed": split_seed})
    data = np.load(path).astype(np.float32)
    order = np.random.default_rng(split_seed).permutation(len(data))
    cut = int(0.8 * len(data))
    train, test = data[order[:cut]], data[order[cut:]]
    if lib == "nfcore":
        spec = {"preset": args.preset, "dim": data.shape[1], "transforms": args.transforms,
                "hidden": args.hidden, "bins": args.bins, "mixing": args.mixing}
        flow, s = fit_nfcore(spec, train, args)
        with torch.no_grad():
            ll = float(flow.log_prob(test).double().mean())
        how = f"{s['steps']} / {s['duration_s']:.0f} s ({s['stopped_reason']})"
    else:
        zflow, loc, scale, z = fit_zuko(train, args)
        with torch.no_grad():
            t = (torch.as_tensor(test) - loc) / scale
            ll = float((zflow().log_prob(t) - torch.log(scale).sum()).double().mean())
        how = f"{z['steps']} / {z['duration_s']:.0f} s"
    print(f"{path.stem:32s} split {split_seed}  {lib:6s} {ll:9.4f}  ({how})", flush=True)
    return {"set": path.stem, "shape": data.shape, "split": split_seed, "lib": lib, "ll": ll,
            "how": how}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--preset", default="nsf_ar")
    parser.add_argument("--transforms", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--mixing", default="lu", choices=["reverse", "random", "lu"],
                        help="what nfcore's preset puts between transforms (zuko: reversed order)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--splits", type=int, default=3, help="random splits, seeds 0..N-1")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--no-init-knots", dest="init_knots", action="store_false",
                        help="start nfcore's splines from their random knots, not the data's")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as in the workers, so the header names their threads
    load_before = os.getloadavg()
    started = time.time()

    files = sorted(args.data.glob("*.npy"))
    if args.datasets:
        files = [f for f in files if f.stem in args.datasets]
    tasks = [(path, split_seed, lib, args) for path in files for split_seed in range(args.splits)
             for lib in ("nfcore", "zuko")]
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.map(run_one, tasks, chunksize=1)
    by = {(r["set"], r["split"], r["lib"]): r for r in results}

    summary, detail, wins, split_wins = [], [], [], []
    for path in files:
        ours = np.array([by[path.stem, k, "nfcore"]["ll"] for k in range(args.splits)])
        theirs = np.array([by[path.stem, k, "zuko"]["ll"] for k in range(args.splits)])
        diff = ours - theirs
        wins.append(ours.mean() >= theirs.mean())
        split_wins.append(int((diff >= 0).sum()))
        shape = by[path.stem, 0, "nfcore"]["shape"]
        summary.append([path.stem, f"{shape[0]} × {shape[1]}", _mean_sd(ours), _mean_sd(theirs),
                        f"{diff.mean():+.4f}", f"{split_wins[-1]} of {args.splits}"])
        for k in range(args.splits):
            a, b = by[path.stem, k, "nfcore"], by[path.stem, k, "zuko"]
            detail.append([path.stem, k, f"{a['ll']:.4f}", f"{b['ll']:.4f}",
                           f"{a['ll'] - b['ll']:+.4f}", a["how"], b["how"]])
    verdict = ("nfcore's mean held-out log-likelihood is at least zuko's on every set"
               if all(wins) else
               f"nfcore's mean is at least zuko's on {sum(wins)} of {len(wins)} sets")
    verdict += (f"; nfcore is at least zuko on {sum(split_wins)} of "
                f"{len(files) * args.splits} (set, split) pairs")
    print(verdict)
    if args.no_write or args.datasets or not args.init_knots:
        return
    load_after = os.getloadavg()
    body = f"""Held-out mean log-likelihood in nats (higher is better), data units, 20 % test split,
over {args.splits} random splits (seeds 0 to {args.splits - 1}; mean ± standard deviation across
splits). nfcore preset `{args.preset}` with `"mixing": "{args.mixing}"` between its transforms, and
zuko `NSF`, which reverses the feature order between transforms; both with {args.transforms}
transforms, hidden {args.hidden}, {args.bins} bins. Budget for each fit: at most {args.steps} steps
and {args.max_seconds:.0f} s, batch {args.batch}, AdamW lr {args.lr:g}, warm-up then cosine decay,
clipping 5, validation on 10 % of the training rows with early stopping (patience {args.patience}
checks) and best-weight restore. Each split's seed also seeds both fits. zuko gets the same split,
schedule and early stopping written out in plain torch, on standardized data (its log-likelihood
corrected by the standardization's log-determinant). nfcore's `fit_density` starts each spline
layer from knots set from the marginals of its input in the training rows (`Flow.initialize`); zuko
starts from its own initialization. {args.jobs} worker processes of {args.threads} torch thread(s)
each.

`uname -a`: `{' '.join(platform.uname())}`. Load average before / after:
{load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores. Total run time
{time.time() - started:.0f} s.

**{verdict}.**

{markdown_table(["data set", "rows × dim", "nfcore", "zuko NSF", "nfcore − zuko (mean)",
                 "splits where nfcore ≥ zuko"], summary)}

Each split:

{markdown_table(["data set", "split", "nfcore", "zuko NSF", "nfcore − zuko",
                 "nfcore steps / time", "zuko steps / time"], detail)}
"""
    cmd = "python benchmarks/density.py " + " ".join(sys.argv[1:])
    print(write_result("density", "Density estimation: held-out log-likelihood, nfcore vs zuko",
                       body, cmd.strip()))


if __name__ == "__main__":
    main()

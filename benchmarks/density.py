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

``--compare cnf`` runs nfcore's ``cnf`` preset trained by flow matching next to zuko's ``CNF``
trained by maximum likelihood (FFJORD), and ``--compare resflow`` nfcore's ``resflow`` next to
normflows' residual flow; each with the best preset (``--preset``, ``nsf_ar`` with ``lu`` mixing)
in the same run, as the reference. All three get the same split, validation rows, early stopping,
schedule and ``--max-seconds`` of wall clock (their step cap, ``--solver-steps``, is set so that
the clock binds). The peers' held-out log-likelihood is exact: zuko's CNF integrates the exact
divergence; normflows' residual flow is scored with the full Jacobian of its data-to-latent map
by autograd (its own ``log_prob`` is a stochastic estimate above two dimensions). On the 2-D sets
both residual flows' densities are also integrated over a grid (``mass``): 1 for a normalised
density. Writes
``benchmarks/results/density_cnf.md`` or ``density_resflow.md``.
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


def fit_nfcore(spec: dict, train: np.ndarray, args,
               validate_every: int | None = None) -> tuple[nfcore.Flow, dict]:
    torch.manual_seed(args.seed)
    flow = nfcore.build(spec)
    result = nfcore.fit_density(flow, train, steps=args.steps, batch_size=args.batch, lr=args.lr,
                                max_seconds=args.max_seconds, seed=args.seed,
                                patience=args.patience, init_knots=args.init_knots,
                                validate_every=validate_every)
    return flow, result.summary


def zuko_nsf(dim: int, args):
    import zuko

    flow = zuko.flows.NSF(dim, transforms=args.transforms, hidden_features=args.hidden,
                          bins=args.bins)
    return flow, lambda x: flow().log_prob(x)


def zuko_cnf(dim: int, args):
    """zuko's CNF as its docs build it, with the hidden widths of nfcore's cnf preset."""
    import zuko

    flow = zuko.flows.CNF(dim, hidden_features=args.cnf_hidden)
    return flow, lambda x: flow().log_prob(x)


def normflows_resflow(dim: int, args, update_lipschitz: bool = True):
    """normflows' residual flow as in its example: Lipschitz MLPs, an ActNorm after each block,
    and ``nf.utils.update_lipschitz`` after every optimizer step ("Make layers Lipschitz
    continuous"): its linear maps are normalised by ``u^T W v`` with power-iteration vectors that
    only that call updates, so without it the bound is never enforced. We give it 5 iterations
    (``LipschitzMLP``'s own ``max_lipschitz_iter``, warm-started each step; the example uses 50).
    ``update_lipschitz=False`` is the earlier configuration of this benchmark, kept for reference.
    """
    import normflows as nf

    blocks = []
    for _ in range(args.transforms):
        net = nf.nets.LipschitzMLP([dim, *args.res_hidden, dim], init_zeros=True,
                                   lipschitz_const=args.lipschitz)
        blocks += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(dim)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), blocks)
    if not update_lipschitz:
        return model, model.log_prob
    return model, model.log_prob, lambda: nf.utils.update_lipschitz(model, 5)


def normflows_resflow_stale(dim: int, args):
    return normflows_resflow(dim, args, update_lipschitz=False)


def exact_normflows_log_prob(model, x: torch.Tensor) -> torch.Tensor:
    """log q(x) from the full Jacobian of the data-to-latent map (rows are independent)."""
    model.train(False)
    out = []
    for i in range(0, x.shape[0], 1000):
        xb = x[i : i + 1000].clone().requires_grad_()
        z = model.inverse(xb)
        jac = torch.stack([torch.autograd.grad(z[:, k].sum(), xb, retain_graph=True)[0]
                           for k in range(x.shape[1])], dim=1)
        base = model.q0.log_prob(z)
        out.append((base + torch.linalg.slogdet(jac)[1]).detach())
    return torch.cat(out)


def grid_mass(log_prob, lim: float = 8.0, n: int = 201) -> float:
    """The integral of a 2-D density over ``[-lim, lim]^2`` (trapezoid rule on an n x n grid):
    1 for a normalised density whose mass lies in the box."""
    t = torch.linspace(-lim, lim, n)
    grid = torch.cartesian_prod(t, t)
    p = torch.cat([log_prob(grid[i : i + 20_000]).detach().exp()
                   for i in range(0, len(grid), 20_000)])
    h = 2 * lim / (n - 1)
    return float(torch.trapezoid(torch.trapezoid(p.reshape(n, n), dx=h, dim=1), dx=h))


def fit_zuko(train: np.ndarray, args, make=zuko_nsf) -> tuple[object, torch.Tensor, torch.Tensor,
                                                              dict]:
    """A peer with nfcore's protocol written out: same split, schedule, clipping, early stop.
    ``make(dim, args)`` returns the model and its ``log_prob`` (and optionally a function to call
    after every optimizer step, as the peer's documentation asks)."""
    x = torch.as_tensor(train, dtype=torch.float32)
    tr_idx, val_idx = split(x.shape[0], 0.1, args.seed)
    x_tr, x_val = x[tr_idx], x[val_idx]
    loc, scale = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    x_tr, x_val = (x_tr - loc) / scale, (x_val - loc) / scale
    torch.manual_seed(args.seed)
    flow, log_prob, *after_step = make(x.shape[1], args)
    params = list(flow.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n = x_tr.shape[0]
    batch = min(args.batch, n)
    per_epoch = math.ceil(n / batch)
    every = min(max(per_epoch, 20), 100)
    best, best_state, bad, step = math.inf, None, 0, 0
    start = time.monotonic()
    perm = None
    flow.train()
    while step < args.steps and time.monotonic() - start < args.max_seconds and bad < args.patience:
        epoch, i = divmod(step, per_epoch)
        if i == 0 or perm is None:
            perm = torch.randperm(n, generator=generator(args.seed, 1, epoch))
        loss = -log_prob(x_tr[perm[i * batch : (i + 1) * batch]]).mean()
        lr = learning_rate(step, args.steps, args.lr, elapsed=time.monotonic() - start,
                           max_seconds=args.max_seconds)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 5.0)):
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
        for hook in after_step:
            hook()
        step += 1
        if step % every == 0 or step >= args.steps:
            flow.train(False)
            with torch.no_grad():
                val = float(-log_prob(x_val).mean())
            flow.train()
            if val < best:
                best, bad = val, 0
                best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
            else:
                bad += 1
    if best_state is not None:
        flow.load_state_dict(best_state)
    flow.train(False)
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
    dim = data.shape[1]
    mass = None
    if lib in ("nfcore", "nfcore_cnf", "nfcore_resflow"):
        spec = {"nfcore": {"preset": args.preset, "dim": dim, "transforms": args.transforms,
                           "hidden": args.hidden, "bins": args.bins, "mixing": args.mixing},
                "nfcore_cnf": {"preset": "cnf", "dim": dim, "hidden": args.cnf_hidden,
                               "activation": args.cnf_activation},
                "nfcore_resflow": {"preset": "resflow", "dim": dim,
                                   "transforms": args.transforms, "hidden": args.res_hidden,
                                   "lipschitz": args.lipschitz}}[lib]
        fit_args = args if lib == "nfcore" else argparse.Namespace(
            **{**vars(args), "steps": args.solver_steps})
        flow, s = fit_nfcore(spec, train, fit_args,
                             validate_every=args.fm_validate_every if lib == "nfcore_cnf" else None)
        with torch.no_grad():
            ll = float(flow.log_prob(test).double().mean())
        how = f"{s['steps']} / {s['duration_s']:.0f} s ({s['stopped_reason']})"
        if lib == "nfcore_resflow" and dim == 2:  # the mass of the density, over standardized units
            loc = torch.as_tensor(train.mean(0))
            scale = torch.as_tensor(train.std(0, ddof=1))
            with torch.no_grad():
                mass = grid_mass(lambda u: flow.log_prob(loc + scale * u)
                                 + torch.log(scale).sum())
    else:
        make = {"zuko": zuko_nsf, "zuko_cnf": zuko_cnf, "normflows_resflow": normflows_resflow,
                "normflows_resflow_stale": normflows_resflow_stale}[lib]
        peer_args = args if lib == "zuko" else argparse.Namespace(
            **{**vars(args), "steps": args.solver_steps})
        zflow, loc, scale, z = fit_zuko(train, peer_args, make)
        t = (torch.as_tensor(test) - loc) / scale
        if lib.startswith("normflows_resflow"):
            lp = exact_normflows_log_prob(zflow, t)
            if dim == 2:
                mass = grid_mass(lambda u: exact_normflows_log_prob(zflow, u))
        else:
            with torch.no_grad():
                lp = zflow().log_prob(t)
        ll = float((lp - torch.log(scale).sum()).double().mean())
        how = f"{z['steps']} / {z['duration_s']:.0f} s"
    if mass is not None:
        how += f", mass {mass:.3f}"
    print(f"{path.stem:32s} split {split_seed}  {lib:23s} {ll:9.4f}  ({how})", flush=True)
    return {"set": path.stem, "shape": data.shape, "split": split_seed, "lib": lib, "ll": ll,
            "how": how, "mass": mass}


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
    parser.add_argument("--compare", choices=["nsf", "cnf", "resflow"], default="nsf",
                        help="nsf: nfcore's best preset vs zuko NSF (density.md); cnf: nfcore cnf "
                             "(flow matching) vs zuko CNF (likelihood); resflow: nfcore resflow "
                             "vs normflows' residual flow; the last two with the best preset")
    parser.add_argument("--solver-steps", type=int, default=1_000_000,
                        help="step cap of the cnf and resflow fits and their peers (the wall "
                             "clock binds first)")
    parser.add_argument("--cnf-hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--cnf-activation", default="silu")
    parser.add_argument("--fm-validate-every", type=int, default=250,
                        help="flow-matching steps between validations (an ODE solve each)")
    parser.add_argument("--res-hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--lipschitz", type=float, default=0.97)
    parser.add_argument("--no-stale-peer", dest="stale_peer", action="store_false",
                        help="resflow: leave out normflows trained without update_lipschitz")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as in the workers, so the header names their threads
    load_before = os.getloadavg()
    started = time.time()

    files = sorted(args.data.glob("*.npy"))
    if args.datasets:
        files = [f for f in files if f.stem in args.datasets]
    if args.compare != "nsf":
        compare_solvers(files, args, load_before, started)
        return
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
layer from knots set from the marginals of its input in the training rows, its conditioner's output
weights zeroed (`Flow.initialize`, `nfcore.layers.spline_start`); zuko starts from its own
initialization. {args.jobs} worker processes of {args.threads} torch thread(s)
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


def compare_solvers(files: list[Path], args, load_before: tuple, started: float) -> None:
    """``--compare cnf`` or ``resflow``: nfcore's family, its peer and the best preset (and for
    resflow, unless ``--no-stale-peer``, the peer as this benchmark first ran it, its Lipschitz
    bound never updated)."""
    ours, peer = {"cnf": ("nfcore_cnf", "zuko_cnf"),
                  "resflow": ("nfcore_resflow", "normflows_resflow")}[args.compare]
    names = {"nfcore_cnf": "nfcore cnf (flow matching)", "zuko_cnf": "zuko CNF (likelihood)",
             "nfcore_resflow": "nfcore resflow", "normflows_resflow": "normflows residual flow",
             "normflows_resflow_stale": "normflows, bound not updated",
             "nfcore": f"nfcore {args.preset}+{args.mixing} (best preset)"}
    extra = ("normflows_resflow_stale",) if args.compare == "resflow" and args.stale_peer else ()
    libs = (ours, peer, *extra, "nfcore")
    tasks = [(path, k, lib, args) for path in files for k in range(args.splits) for lib in libs]
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.map(run_one, tasks, chunksize=1)
    by = {(r["set"], r["split"], r["lib"]): r for r in results}
    summary, detail, masses, wins = [], [], [], []
    stale_wins, stale_wins_corrected = [], []
    for path in files:
        ll = {lib: np.array([by[path.stem, k, lib]["ll"] for k in range(args.splits)])
              for lib in libs}
        wins.append(ll[ours].mean() >= ll[peer].mean())
        shape = by[path.stem, 0, ours]["shape"]
        summary.append([path.stem, f"{shape[0]} × {shape[1]}", _mean_sd(ll[ours]),
                        _mean_sd(ll[peer]), f"{(ll[ours] - ll[peer]).mean():+.4f}",
                        *[_mean_sd(ll[lib]) for lib in extra],
                        _mean_sd(ll["nfcore"]), f"{(ll[ours] - ll['nfcore']).mean():+.4f}"])
        for k in range(args.splits):
            detail.append([path.stem, k, *[f"{by[path.stem, k, lib]['ll']:.4f}" for lib in libs],
                           *[by[path.stem, k, lib]["how"] for lib in libs]])
        mass = {lib: np.array([by[path.stem, k, lib]["mass"] or np.nan
                               for k in range(args.splits)]) for lib in libs}
        corrected = {lib: ll[lib] - np.log(mass[lib]) if np.isfinite(mass[lib]).all()
                     else ll[lib] for lib in libs}
        if extra:
            stale_wins.append(ll[ours].mean() >= ll[extra[0]].mean())
            stale_wins_corrected.append(corrected[ours].mean() >= corrected[extra[0]].mean())
        if np.isfinite(mass[ours]).all():
            masses.append([path.stem, *[f"{mass[lib].mean():.3f} / {corrected[lib].mean():.4f}"
                                        for lib in (ours, peer, *extra)]])
    verdict = (f"{names[ours]}'s mean held-out log-likelihood is at least {names[peer]}'s on "
               f"{sum(wins)} of {len(wins)} sets")
    if extra:
        verdict += (f"; against {names[extra[0]]}: on {sum(stale_wins)} of {len(wins)} as "
                    f"measured, on {sum(stale_wins_corrected)} of {len(wins)} with the 2-D "
                    "figures corrected by their grid mass")
    print(verdict)
    for row in summary:
        print(row)
    for row in masses:
        print(row)
    if args.no_write or args.datasets:
        return
    arch = (f"nfcore `cnf` preset: a standardize layer and one CNF layer, vector field MLP "
            f"{args.cnf_hidden} ({args.cnf_activation}), dopri5 at rtol 1e-5 / atol 1e-6, "
            f"trained by flow matching (conditional OT paths), validated every "
            f"{args.fm_validate_every} steps by the exact held-out likelihood. zuko `CNF` with "
            f"hidden {args.cnf_hidden} (ELU, its default), trained by maximum likelihood through "
            f"its solver (rtol 1e-5 / atol 1e-6)."
            if args.compare == "cnf" else
            f"nfcore `resflow` preset: standardize and a triangular loc_scale, then "
            f"{args.transforms} blocks of ActNorm and a residual layer, Lipschitz MLP "
            f"{args.res_hidden} with LipSwish, bound {args.lipschitz} (split evenly over its "
            f"linear maps), exact log-determinant (dim <= 16); `fit_density` starts ActNorm and "
            f"the LipSwish bends from the training data. normflows: {args.transforms} `Residual` blocks with "
            f"`LipschitzMLP([dim, *{args.res_hidden}, dim], lipschitz_const={args.lipschitz})`, "
            f"each followed by `ActNorm`, trained with its unbiased power-series estimator and "
            f"`nf.utils.update_lipschitz(model, 5)` after every optimizer step, as its example "
            f"does (it keeps the power-iteration vectors, hence the bound, current); its test "
            f"log-likelihood is computed exactly (full Jacobian by autograd)."
            + (" 'normflows, bound not updated' is the same model trained without that call, "
               "as this benchmark first ran it: its maps are then normalised by stale vectors "
               "and its Lipschitz bound is not enforced." if extra else ""))
    mass_section = "" if not masses else f"""
On the 2-D sets each residual flow's density is integrated over a 201 x 201 grid on [-8, 8]^2 in
standardized units (trapezoid rule): mass, then the log-likelihood corrected by it
(log-likelihood − log mass; the figures above are as measured, uncorrected; the verdict uses them):

{markdown_table(["data set", *[f"{names[lib]}: mass / corrected" for lib in (ours, peer, *extra)]],
                masses)}
"""
    body = f"""Held-out mean log-likelihood in nats (higher is better), data units, 20 % test split,
over {args.splits} random splits (seeds 0 to {args.splits - 1}; mean ± sd across splits), the
protocol of `density.md`: validation on 10 % of the training rows with early stopping (patience
{args.patience} checks) and best-weight restore, batch {args.batch}, AdamW lr {args.lr:g}, warm-up
then cosine decay over whichever of steps and wall clock is further along, clipping 5. Equal
wall-clock budget: {args.max_seconds:.0f} s for every fit (the best preset also at most
{args.steps} steps, as in `density.md`). {arch} Peers see standardized data, their likelihood
corrected by the standardization's log-determinant. {args.jobs} worker processes of
{args.threads} torch thread(s) each. The machine was shared with other engineers' jobs, so the
wall-clock budget bought fewer steps than on a quiet machine.

`uname -a`: `{' '.join(platform.uname())}`. Load average before / after:
{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores. Total run time
{time.time() - started:.0f} s.

**{verdict}.**

{markdown_table(["data set", "rows × dim", names[ours], names[peer], "difference (mean)",
                 *[names[lib] for lib in extra],
                 names["nfcore"], f"{names[ours]} − best preset"], summary)}
{mass_section}
Each split (steps / time of each fit):

{markdown_table(["data set", "split", *[names[lib] for lib in libs],
                 *[f"{names[lib]} steps / time" for lib in libs]], detail)}
"""
    cmd = "python benchmarks/density.py " + " ".join(sys.argv[1:])
    print(write_result(f"density_{args.compare}",
                       f"Density estimation: nfcore {args.compare} vs its peer", body,
                       cmd.strip()))


if __name__ == "__main__":
    main()

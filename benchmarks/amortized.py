"""Amortized inference on a model whose posterior is known exactly: train once, then answer the
posterior of any new observation with one pass, next to a separate fit per observation.

The model is 10-D linear Gaussian, ``theta ~ N(0, 0.1 I)``, ``x | theta ~ N(theta, 0.1 I)``, written
in the model language with ``x`` as its context; the exact posterior is ``N(x / 2, 0.05 I)``. The
training contexts come from the prior predictive, drawn here (seeded).

- **Amortized.** One conditional flow is fit with ``nfcore.fit_target(flow, model,
  contexts=...)``. Then, for ``--observations`` fresh observations (prior predictive, another seed):
  the worst error of the posterior mean (``--samples`` draws each) and the worst deviation of the
  sd ratio, both over every coordinate and observation and in posterior sd; k̂ and the verdict at
  each observation (``nfcore.train.evaluate_target``); and the time to answer one posterior
  query (``--query-n`` draws with their log density), in-process and over HTTP against a real
  ``uvicorn`` server (``service.api.app``) serving the saved flow, ``POST /sample`` with the
  observation as ``context``.
- **Refit.** ``nfcore.fit_target`` of the same model at one observation (``model.at(x)``, an
  unconditional flow of the same family) on a subset of ``--refit-observations`` of them: budgets
  of ``--refit-steps`` steps, in order, until every refit's worst error is within the amortized
  flow's worst (or the goal, 0.1 sd, whichever is larger). The time of one refit at that budget
  (Pathfinder start, training and the closing diagnostics, as a user gets it) is what one
  posterior costs without amortization.

Goals (issue 15): errors within 0.1 sd on every observation; a query answered at least 1000x
faster than refitting. One thread throughout (``torch.set_num_threads(1)``, server included).

    python benchmarks/amortized.py [--steps 3000] [--contexts 4000] [--observations 100]

Writes ``benchmarks/results/amortized.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nfcore  # noqa: E402
from benchmarks._machine import markdown_table, write_result  # noqa: E402
from benchmarks.serving import Server  # noqa: E402
from nfcore.train import evaluate_target  # noqa: E402
from service.client import Client  # noqa: E402

D, PRIOR_VAR, NOISE_VAR = 10, 0.1, 0.1
POST_VAR = 1.0 / (1.0 / PRIOR_VAR + 1.0 / NOISE_VAR)
POST_SD = POST_VAR ** 0.5
MODEL = {"params": {"theta": {"shape": [D]}},
         "context": {"x": {"shape": [D]}},
         "log_prob": [f"normal_lpdf(theta, 0, sqrt({PRIOR_VAR}))",
                      f"normal_lpdf(x, theta, sqrt({NOISE_VAR}))"]}
GOAL_ERROR, GOAL_SPEEDUP = 0.1, 1000.0


def prior_predictive(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = PRIOR_VAR ** 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return theta + NOISE_VAR ** 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)


def exact_mean(x: torch.Tensor) -> torch.Tensor:
    return x * (POST_VAR / NOISE_VAR)


def errors(draws: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """(worst |mean error| in posterior sd, worst |sd ratio - 1|) over the coordinates."""
    draws = draws.double()
    mean_err = float(((draws.mean(0) - exact_mean(x)).abs() / POST_SD).max())
    sd_err = float((draws.std(0) / POST_SD - 1).abs().max())
    return mean_err, sd_err


def spec(args: argparse.Namespace, context_dim: int) -> dict:
    return {"preset": args.preset, "dim": D, "context_dim": context_dim,
            "transforms": args.transforms, "hidden": [args.hidden, args.hidden]}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times), min(times)


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--preset", default="realnvp")
    parser.add_argument("--transforms", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--observations", type=int, default=100)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--query-n", type=int, default=1000)
    parser.add_argument("--query-repeats", type=int, default=50)
    parser.add_argument("--refit-observations", type=int, default=5)
    parser.add_argument("--refit-steps", type=int, nargs="+", default=[10, 100, 1000, 3000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = load_average()
    model = nfcore.targets.from_spec(MODEL)

    # ---------------------------------------------------------------- amortized
    torch.manual_seed(args.seed)
    flow = nfcore.build(spec(args, D))
    tick = time.perf_counter()
    fit = nfcore.fit_target(flow, model, contexts=prior_predictive(args.contexts, args.seed),
                            steps=args.steps, batch_size=args.batch_size,
                            context_batch=args.context_batch, lr=args.lr, seed=args.seed)
    train_s = time.perf_counter() - tick
    print(f"amortized fit: {train_s:.1f} s, verdict {fit.summary['diagnostics']['verdict']}",
          flush=True)

    fresh = prior_predictive(args.observations, args.seed + 1000)
    g = torch.Generator().manual_seed(args.seed + 1)
    mean_errs, sd_errs, ks, verdicts = [], [], [], []
    with torch.no_grad():
        for i, x in enumerate(fresh):
            draws = flow.sample(args.samples, context=x, generator=g)
            m, s = errors(draws, x)
            mean_errs.append(m)
            sd_errs.append(s)
            report = evaluate_target(flow, model, 2000, args.seed + i, context=x[None])
            ks.append(report["diagnostics"]["pareto_k"])
            verdicts.append(report["diagnostics"]["verdict"])
    ok_share = sum(v == "ok" for v in verdicts) / len(verdicts)
    print(f"amortized: worst mean error {max(mean_errs):.3f} sd, worst sd ratio deviation "
          f"{max(sd_errs):.3f}, k̂ median {statistics.median(ks):.2f} max {max(ks):.2f}, "
          f"ok {ok_share:.0%}", flush=True)

    x0 = fresh[0]
    with torch.no_grad():
        query_in, query_in_best = timed(lambda: flow.sample_and_log_prob(args.query_n, context=x0),
                         args.query_repeats)

    # over HTTP: the saved flow behind a real server
    tmp = Path(tempfile.mkdtemp(prefix="nfserve-amortized-"))
    try:
        models = tmp / "models"
        (models / "linear_gaussian" / "1").mkdir(parents=True)
        nfcore.save(flow, models / "linear_gaussian" / "1" / "model.safetensors",
                    metadata={"summary": {"objective": "variational", "amortized": True}})
        with Server(models, torch_threads="1") as server, Client(server.url, timeout=120) as c:
            samples, _ = c.sample("linear_gaussian", args.query_n, seed=1, context=x0.tolist())
            http_err = errors(torch.as_tensor(samples), x0)
            query_http, query_http_best = timed(lambda: c.sample("linear_gaussian", args.query_n,
                                                context=x0.tolist(), binary=False),
                                                args.query_repeats)
            query_bin, query_bin_best = timed(lambda: c.sample("linear_gaussian", args.query_n,
                                              context=x0.tolist(), binary=True),
                                              args.query_repeats)
            bad = httpx.post(server.url + "/sample", json={"model": "linear_gaussian", "n": 3,
                                                           "context": [0.0] * (D - 1)})
            http_bad = f"{bad.status_code}: {bad.json().get('detail', '')}"[:160]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"query: in-process {1e3 * query_in:.2f} ms, HTTP {1e3 * query_http:.2f} ms (JSON), "
          f"{1e3 * query_bin:.2f} ms (binary)", flush=True)
    query_http_any = min(query_http, query_bin)

    # ---------------------------------------------------------------- refits
    target_err = max(max(mean_errs), GOAL_ERROR)
    refit_rows = []
    chosen = None
    for steps in args.refit_steps:
        times, m_errs, s_errs, kk, vv = [], [], [], [], []
        for i, x in enumerate(fresh[:args.refit_observations]):
            torch.manual_seed(args.seed + i)
            single = nfcore.build(spec(args, 0))
            tick = time.perf_counter()
            result = nfcore.fit_target(single, model.at(x[None]), steps=steps,
                                       batch_size=args.batch_size, lr=args.lr, seed=args.seed + i)
            times.append(time.perf_counter() - tick)
            with torch.no_grad():
                m, s = errors(single.sample(args.samples, generator=g), x)
            m_errs.append(m)
            s_errs.append(s)
            kk.append(result.summary["diagnostics"]["pareto_k"])
            vv.append(result.summary["diagnostics"]["verdict"])
        row = {"steps": steps, "time": statistics.median(times), "mean": max(m_errs),
               "sd": max(s_errs), "k": max(kk), "ok": sum(v == "ok" for v in vv) / len(vv)}
        refit_rows.append(row)
        print(f"refit {steps} steps: {row}", flush=True)
        if row["mean"] <= target_err and row["sd"] <= max(max(sd_errs), GOAL_ERROR):
            chosen = row
            break
    chosen = chosen or refit_rows[-1]
    speed_in = chosen["time"] / query_in
    speed_http = chosen["time"] / query_http_any
    load_after = load_average()

    met_error = max(mean_errs) <= GOAL_ERROR and max(sd_errs) <= GOAL_ERROR
    table = markdown_table(
        ["method", "observations", "worst mean error (post. sd)", "worst sd ratio - 1",
         "k̂ median / max", "verdict ok", "time per posterior"],
        [[f"amortized ({args.preset}, one fit of {train_s:.0f} s)", args.observations,
          f"{max(mean_errs):.3f}", f"{max(sd_errs):.3f}",
          f"{statistics.median(ks):.2f} / {max(ks):.2f}", f"{ok_share:.0%}",
          f"{1e3 * query_in:.2f} ms in-process (best {1e3 * query_in_best:.2f}); "
          f"{1e3 * query_http:.2f} ms over HTTP JSON (best {1e3 * query_http_best:.2f}); "
          f"{1e3 * query_bin:.2f} ms over HTTP safetensors (best {1e3 * query_bin_best:.2f})"]]
        + [[f"refit per observation, {r['steps']} steps", args.refit_observations,
            f"{r['mean']:.3f}", f"{r['sd']:.3f}", f"- / {r['k']:.2f}", f"{r['ok']:.0%}",
            f"{r['time']:.2f} s"] for r in refit_rows])
    body = f"""Model: 10-D linear Gaussian, theta ~ N(0, 0.1 I), x | theta ~ N(theta, 0.1 I), in the model
language with `x` as its `context`; exact posterior N(x/2, 0.05 I). Training contexts:
{args.contexts} draws from the prior predictive (seed {args.seed}); {args.observations} fresh
observations (seed {args.seed + 1000}).

- Load average: before the run {load_before}; after it {load_after}. The machine is shared with other
  jobs, so times are noisy; the ratios compare figures measured in this run.
- Amortized flow: `{spec(args, D)}`, `fit_target(..., contexts=..., steps={args.steps},
  batch_size={args.batch_size}, context_batch={args.context_batch}, lr={args.lr})`:
  {train_s:.1f} s; its own held-out diagnostics: verdict
  `{fit.summary['diagnostics']['verdict']}`, k̂ median {fit.summary['diagnostics']['pareto_k_median']}
  / max {fit.summary['diagnostics']['pareto_k']}, share ok {fit.summary['diagnostics']['ok_share']:.0%}
  of {fit.summary['diagnostics']['contexts']} held-out contexts.
- Errors from {args.samples} draws per observation (Monte-Carlo sd of a mean: {1 / args.samples ** 0.5:.3f}
  posterior sd); k̂ from 2000 draws per observation.
- One query: {args.query_n} draws with their log density, median of {args.query_repeats}. Over HTTP:
  `POST /sample` with the observation as `context`, as JSON and as a safetensors body, one
  uvicorn server (one torch thread) on 127.0.0.1 serving the saved flow, `service.client`; the
  worst mean error of one such answer's {args.query_n} draws is {http_err[0]:.3f} sd (Monte-Carlo
  sd of a mean: {1 / args.query_n ** 0.5:.3f}). A context of the wrong size gets `{http_bad}`.
- Refits: `fit_target(flow, model.at(x), steps=...)` of an unconditional flow of the same
  family, on the first {args.refit_observations} observations (a subset, to keep the run short), each
  budget in turn until its worst errors are within the amortized flow's (or 0.1 sd); time is a
  whole `fit_target` call (Pathfinder start, training, closing diagnostics of 20000 draws),
  median over the observations. For this Gaussian model the Pathfinder start is already the exact
  posterior, so a refit reaches the accuracy with few steps: the most favourable case for
  refitting.

{table}

**Speed-up** (one refit at {chosen['steps']} steps, {chosen['time']:.2f} s, over one query):
{speed_in:,.0f}x in-process, {speed_http:,.0f}x over HTTP (the faster of JSON and safetensors; goal {GOAL_SPEEDUP:,.0f}x:
{'met' if speed_http >= GOAL_SPEEDUP else 'not met over HTTP'}{'' if speed_in >= GOAL_SPEEDUP else ', not met in-process'}).
**Accuracy**: worst mean error {max(mean_errs):.3f} sd and sd ratio within {max(sd_errs):.3f} over
{args.observations} observations (goal 0.1 sd: {'met' if met_error else 'not met'}).
"""
    print(body)
    if not args.no_write:
        command = "python benchmarks/amortized.py " + " ".join(sys.argv[1:])
        path = write_result("amortized", "Amortized inference: one flow for every observation",
                            body, command.strip())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

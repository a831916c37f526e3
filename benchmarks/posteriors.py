"""Real Bayesian posteriors from posteriordb, written in the model language and fit by reverse KL.

Each posterior in ``../shared/data/posteriordb/`` (beside the repository) has its Stan program,
data and 10,000 reference draws. Its model, written in nfcore's model language, is the JSON file
of the same name in ``benchmarks/posteriors/``: ``{"posterior", "note", "data": [names taken from
posteriordb's data.json], "model": {"params", "log_prob", "derived"}}``.

Per posterior, in one run and at the same time budget on the same thread count:

- nfcore: ``fit_target`` with a default preset (``--preset``, default ``nsf``) and a time budget
  (``--seconds``, default 120);
- Pyro's ``AutoIAFNormal`` (falling back to ``AutoNormal`` if the IAF guide diverges) trained by
  SVI on the very same log density (``ModelTarget.log_prob``) with the same batch of samples per
  step.

From ``--draws`` fresh samples of each fit, in the constrained space (``Target.draws``), it reports
the worst absolute mean error and the worst sd ratio, both in reference posterior sd, over every
column of the reference (transformed parameters through ``derived``); the same after sampling
importance resampling with the self-normalised weights ``target_log_prob - log_prob``; and, for
nfcore, k̂ and the verdict of ``result.summary["diagnostics"]`` ("n/a" where a build of nfcore has
none). The goal: every mean within 0.1 sd and every sd ratio within [0.9, 1.1] on the raw samples,
and a verdict other than ``ok`` wherever that is missed.

    python benchmarks/posteriors.py [--seconds 120] [--posteriors arK-arK,sblrc-blr] [--threads 1]

Writes ``benchmarks/results/posteriors.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfcore  # noqa: E402
from benchmarks._machine import markdown_table, write_result  # noqa: E402
from nfcore.targets import ModelTarget  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE / "posteriors"
POSTERIORDB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "posteriordb"
GOAL_MEAN, GOAL_SD = 0.1, (0.9, 1.1)
BATCH = 256


def load(name: str) -> tuple[ModelTarget, dict[str, Any]]:
    entry = json.loads((MODELS / f"{name}.json").read_text())
    folder = POSTERIORDB / name
    data = json.loads((folder / "data.json").read_text())
    reference = json.loads((folder / "reference.json").read_text())
    model = ModelTarget({**entry["model"], "data": {k: data[k] for k in entry["data"]}},
                        name=name)
    return model, reference


def zero_based(column: str) -> str:
    """posteriordb's Stan column names are 1-based (``beta[1]``, ``L[2,1]``); ours are 0-based."""
    m = re.fullmatch(r"(\w+)\[([\d,\s]+)\]", column)
    if not m:
        return column
    return f"{m[1]}[{','.join(str(int(i) - 1) for i in m[2].split(','))}]"


def moments_error(columns: list[str], samples: torch.Tensor, reference: dict,
                  weights: torch.Tensor | None = None) -> tuple[float, float, str, str]:
    """Worst |mean error| and the sd ratio farthest from 1, in reference sd, over the reference's
    columns; with ``weights``, on a sampling-importance-resample of the samples."""
    index = {c: i for i, c in enumerate(columns)}
    if weights is not None:
        g = torch.Generator().manual_seed(1)
        picks = torch.multinomial(weights, samples.shape[0], replacement=True, generator=g)
        samples = samples[picks]
    worst_mean, worst_sd, where_mean, where_sd = 0.0, 1.0, "", ""
    for column in reference["columns"]:
        ref = reference["parameters"][column]
        x = samples[:, index[zero_based(column)]]
        err = abs(float(x.mean()) - ref["mean"]) / ref["sd"]
        ratio = float(x.std()) / ref["sd"]
        if not math.isfinite(err) or err > worst_mean:
            worst_mean, where_mean = err, column
        if _off(ratio) > _off(worst_sd) or not where_sd:
            worst_sd, where_sd = ratio, column
    return worst_mean, worst_sd, where_mean, where_sd


def _off(ratio: float) -> float:
    """How far an sd ratio is from 1, on a log scale (infinite for 0 or NaN)."""
    return abs(math.log(ratio)) if math.isfinite(ratio) and ratio > 0 else math.inf


def report(model: ModelTarget, reference: dict, z: torch.Tensor, log_q: torch.Tensor) -> dict:
    draws = model.draws(z.double(), log_q.double())
    log_w = draws.log_weights
    finite = torch.isfinite(log_w)
    weights = torch.softmax(torch.where(finite, log_w, float("-inf")), 0)
    raw = moments_error(draws.columns, draws.samples, reference)
    resampled = moments_error(draws.columns, draws.samples, reference, weights)
    ess = float(1.0 / (weights * weights).sum()) / len(weights)
    return {"raw": raw, "is": resampled, "ess": ess}


@torch.no_grad()
def sample(draw, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    zs, lqs = [], []
    for i in range(0, n, 4096):
        z, lq = draw(min(4096, n - i))
        zs.append(z)
        lqs.append(lq)
    return torch.cat(zs), torch.cat(lqs)


def run_nfcore(model: ModelTarget, reference: dict, args) -> dict:
    torch.manual_seed(args.seed)
    flow = nfcore.build({"preset": args.preset, "dim": model.dim, **args.options})
    start = time.perf_counter()
    result = nfcore.fit_target(flow, model, max_seconds=args.seconds, batch_size=BATCH,
                               seed=args.seed)
    wall = time.perf_counter() - start
    z, log_q = sample(lambda m: flow.sample_and_log_prob(m), args.draws)
    out = report(model, reference, z, log_q)
    diagnostics = result.summary.get("diagnostics") or {}
    out.update(method=f"nfcore {args.preset}", steps=result.summary.get("steps"), wall=wall,
               k_hat=diagnostics.get("pareto_k", "n/a"), verdict=diagnostics.get("verdict", "n/a"),
               reasons=diagnostics.get("reasons", []))
    return out


def _pyro_fit(model: ModelTarget, args, guide_kind: str):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)

    base = dist.Normal(torch.zeros(model.dim), 1.0).to_event(1)

    def pyro_model():
        # A sampleable site (Pyro's guides initialise from it) whose density the factor cancels:
        # the joint density is exactly the model's.
        z = pyro.sample("z", base)
        flat = z.reshape(-1, model.dim)
        log_density = model.log_prob(flat) - base.log_prob(flat)
        pyro.factor("log_density", log_density.reshape(z.shape[:-1]))

    guide = AutoIAFNormal(pyro_model) if guide_kind == "iaf" else AutoNormal(pyro_model)
    svi = SVI(pyro_model, guide, pyro.optim.ClippedAdam({"lr": 1e-3, "clip_norm": 5.0}),
              Trace_ELBO(num_particles=BATCH, vectorize_particles=True))
    start, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < args.seconds:
        losses.append(svi.step())
        steps += 1
    wall = time.perf_counter() - start
    posterior = guide.get_posterior() if guide_kind == "iaf" else None

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if posterior is not None:
            z = posterior.rsample((m,))
            return z, posterior.log_prob(z)
        loc, scale = guide.locs.z, guide.scales.z  # AutoNormal: independent normals
        d = torch.distributions.Normal(loc, scale)
        z = d.rsample((m,))
        return z, d.log_prob(z).sum(-1)

    converged = all(math.isfinite(v) for v in losses[-20:])
    return draw, steps, wall, converged


def run_pyro(model: ModelTarget, reference: dict, args) -> dict:
    draw, steps, wall, converged = _pyro_fit(model, args, "iaf")
    method = "Pyro AutoIAFNormal"
    z, log_q = sample(draw, args.draws)
    if not converged or not bool(torch.isfinite(z).all()):
        draw, steps, wall, converged = _pyro_fit(model, args, "normal")
        method = "Pyro AutoNormal (IAF diverged)"
        z, log_q = sample(draw, args.draws)
    out = report(model, reference, z, log_q)
    out.update(method=method, steps=steps, wall=wall, k_hat="n/a", verdict="n/a", reasons=[])
    try:
        from nfcore.train.diagnostics import psis

        out["k_hat"] = psis(model.draws(z.double(), log_q.double()).log_weights)[1]
    except ImportError:
        pass
    return out


def goal(out: dict) -> str:
    mean, sd = out["raw"][0], out["raw"][1]
    met = mean <= GOAL_MEAN and GOAL_SD[0] <= sd <= GOAL_SD[1]
    if met:
        return "met"
    return "missed, verdict ok!" if out["verdict"] == "ok" else "missed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="time budget of each fit")
    parser.add_argument("--posteriors", default="", help="comma-separated names (default: all)")
    parser.add_argument("--preset", default="nsf")
    parser.add_argument("--options", type=json.loads, default={},
                        help='preset options as JSON, e.g. \'{"asinh": true}\'')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pyro", action="store_true", help="skip the Pyro peer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not POSTERIORDB.is_dir():
        raise SystemExit(f"posteriordb data not found at {POSTERIORDB}")
    names = ([n for n in args.posteriors.split(",") if n] if args.posteriors
             else sorted(p.stem for p in MODELS.glob("*.json")))

    rows = []
    for name in names:
        model, reference = load(name)
        outs = [run_nfcore(model, reference, args)]
        if not args.no_pyro:
            outs.append(run_pyro(model, reference, args))
        for out in outs:
            k = out["k_hat"]
            rows.append([
                name, model.dim, out["method"], out["steps"], round(out["wall"], 1),
                f"{out['raw'][0]:.3f} ({out['raw'][2]})", f"{out['raw'][1]:.3f} ({out['raw'][3]})",
                f"{out['is'][0]:.3f}", f"{out['is'][1]:.3f}", round(out["ess"], 3),
                f"{k:.2f}" if isinstance(k, float) else k, out["verdict"], goal(out),
            ])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["posterior", "dim", "method", "steps", "wall s", "worst |mean err| (sd)",
               "worst sd ratio", "after IS: mean err", "after IS: sd ratio", "IS ESS frac", "k̂",
               "verdict", "goal (raw)"]
    body = (f"Budget: {args.seconds:g} s per fit, {args.threads} thread(s), batch {BATCH}, "
            f"{args.draws} draws per fit; nfcore preset `{args.preset}` with "
            + (f"the options {json.dumps(args.options)}. " if args.options else "its defaults. ")
            + "Errors are in reference posterior sd over every reference column (worst column in "
            "brackets); 'after IS' is a sampling-importance-resample with the self-normalised "
            "weights target_log_prob - log_prob. Goal: every |mean err| <= 0.1 and every sd "
            "ratio in [0.9, 1.1] on the raw samples, and a verdict other than ok wherever "
            "that is missed. Wall time: the whole fit_target call for nfcore (training, then its "
            "diagnostics on 20,000 samples), the SVI loop for Pyro.\n\n"
            + markdown_table(headers, rows))
    command = "python benchmarks/posteriors.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    path = write_result("posteriors", "posteriordb posteriors: nfcore vs Pyro", body,
                        command.strip())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

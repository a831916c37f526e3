"""Do a density fit's diagnostics say "do not trust this" where they should?

Default fits (``fit_density`` with its defaults: a validation split, early stopping) of one preset
on data sets whose trouble is known in advance, next to sets that a flow should fit well:

- *gaussian 5-D*: correlated Gaussian rows, which the data's own Gaussian fits exactly;
- *mixture of 4*: four separated clusters in 2-D (the ideal mean log-likelihood is known: -2.84);
- *student-t 3-D*: heavy tails (3 degrees of freedom), which a flow with a Gaussian base cannot
  follow far out;
- *lognormal 3-D*: heavier tails still (``exp(1.5 N(0, 1))``);
- *counts*: two Poisson columns (means 3 and 10): a lattice, on which a continuous density is
  degenerate;
- *60 rows*: a 5-D Gaussian sample too small to judge (6 held-out rows);
- the four sbibm posterior sample sets of ``../shared/data`` when present (real data).

For each: the held-out mean log-likelihood per row, that of the training rows' Gaussian, the
latent KS distance, the verdict and the first words of each reason; and, where the trouble is
known, whether the verdict said so (``expected``). Fits run in ``--jobs`` processes of one torch
thread each.

    python benchmarks/density_diagnostics.py [--preset nsf] [--steps 1500] [--jobs 2]

Writes ``benchmarks/results/density_diagnostics.md``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nfcore  # noqa: E402
from benchmarks._machine import markdown_table, write_result  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data(case: str) -> np.ndarray:
    g = torch.Generator().manual_seed(0)

    def gaussian(n: int, d: int) -> torch.Tensor:
        a = torch.randn(d, d, generator=g) / math.sqrt(d)
        return torch.randn(n, d, generator=g) @ (a + torch.eye(d)) * 3 + 5

    if case == "gaussian 5-D":
        x = gaussian(5000, 5)
    elif case == "mixture of 4":
        centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]])
        x = centres[torch.randint(4, (4000,), generator=g)] + 0.5 * torch.randn(4000, 2, generator=g)
    elif case == "student-t 3-D":
        chi2 = torch.randn(5000, 3, 3, generator=g).square().sum(-1)
        x = torch.randn(5000, 3, generator=g) / torch.sqrt(chi2 / 3)
    elif case == "lognormal 3-D":
        x = torch.exp(1.5 * torch.randn(5000, 3, generator=g))
    elif case == "counts":
        x = torch.stack([torch.poisson(torch.full((3000,), 3.0), generator=g),
                         torch.poisson(torch.full((3000,), 10.0), generator=g)], 1)
    elif case == "60 rows":
        x = gaussian(60, 5)
    else:
        return np.load(DATA / f"{case}.npy").astype(np.float64)
    return x.double().numpy()


#: What a fit of each case should be told, where that is known in advance.
EXPECTED = {"counts": "not ok (a lattice)", "60 rows": "not ok (too few rows)",
            "student-t 3-D": "not ok (heavy tails)", "lognormal 3-D": "not ok (heavy tails)"}


def run(job: tuple[str, str, int]) -> dict:
    case, preset, steps = job
    torch.set_num_threads(1)
    x = _data(case)
    torch.manual_seed(0)
    flow = nfcore.build({"preset": preset, "dim": x.shape[1]})
    result = nfcore.fit_density(flow, x, steps=steps, seed=0)
    # "rows" is the diagnostics': the rows scored (held out), a tenth of the data's
    return {"case": case, "dim": x.shape[1], "steps": result.summary["steps"],
            **result.summary["diagnostics"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="nsf")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    cases = args.cases or (["gaussian 5-D", "mixture of 4", "student-t 3-D", "lognormal 3-D",
                            "counts", "60 rows"]
                           + sorted(p.stem for p in DATA.glob("*.npy")))
    jobs = [(c, args.preset, args.steps) for c in cases]
    if args.jobs == 1:
        found = [run(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            found = pool.map(run, jobs)
    rows = []
    for r in found:
        expected = EXPECTED.get(r["case"], "—")
        said = ("yes" if r["verdict"] != "ok" else "NO") if expected != "—" else "—"
        reasons = "; ".join(reason.split(":")[0][:60] for reason in r["reasons"]) or "—"
        rows.append([r["case"], f"{r['rows']} × {r['dim']}", r["steps"], f"{r['log_lik']:.3f}",
                     f"{r['gaussian_log_lik']:.3f}", f"{r['latent_ks']:.3f}", r["verdict"],
                     reasons, expected, said])
    headers = ["data", "rows scored × dim", "steps", "held-out log-lik", "Gaussian's", "latent KS",
               "verdict", "reasons (first words)", "expected", "said so"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_write:
        body = (f"Preset `{args.preset}`, `fit_density` defaults (10 % of the rows held out, early "
                f"stopping, best weights restored), at most {args.steps} steps, seed 0; "
                f"{args.jobs} processes of one torch thread. Log-likelihoods are means per held-out "
                "row in nats; *Gaussian's* is that of the training rows' mean and covariance on "
                "the same rows.\n\n" + table)
        cmd = "python benchmarks/density_diagnostics.py " + " ".join(argv or sys.argv[1:])
        path = write_result("density_diagnostics", "Density fits' diagnostics on known cases",
                            body, cmd.strip())
        print(f"wrote {path}")
    return found


if __name__ == "__main__":
    main()

"""Train the demo models shipped in ``models/``: variational fits of U1-U4 and a density fit of the
sbibm two-moons posterior. Each is a small NSF with its ``FitResult.summary`` as metadata.

    python scripts/make_demo_models.py [--out models] [--data /work/shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import nfcore

SPEC = {"preset": "nsf", "dim": 2, "transforms": 4, "hidden": [32, 32], "bins": 8}


def _save(flow: nfcore.Flow, summary: dict, out: Path, name: str) -> None:
    path = out / name / "1" / "model.safetensors"
    nfcore.save(flow, path, metadata={"training": summary})
    print(f"{name}: {path} ({path.stat().st_size} bytes) "
          + json.dumps({k: summary.get(k) for k in ("kl", "ess_fraction", "val_loss", "steps",
                                                    "duration_s")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    for name in ("U1", "U2", "U3", "U4"):
        torch.manual_seed(args.seed)
        flow = nfcore.build({**SPEC, "standardize": False})
        result = nfcore.fit_target(flow, name, steps=args.steps, lr=3e-3, seed=args.seed)
        _save(result.flow, result.summary, args.out, name.lower())

    data = np.load(args.data / "sbibm_two_moons_obs1.npy")
    torch.manual_seed(args.seed)
    flow = nfcore.build(SPEC)
    result = nfcore.fit_density(flow, data, steps=args.steps, lr=3e-3, seed=args.seed)
    summary = {**result.summary, "dataset": "sbibm_two_moons_obs1.npy"}
    _save(result.flow, summary, args.out, "two_moons")


if __name__ == "__main__":
    main()

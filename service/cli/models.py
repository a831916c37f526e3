"""``nfserve sample`` and ``nfserve models``: draw samples and list models, from the local model
store or, with ``--url``, from a server (through the client alone, so they work without torch)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ..client import Client, NFServeError
from .common import CommandError, guard, subcommand
from .common import settings as load_settings

__all__ = ["add_sample", "add_models"]


def _write_rows(rows: Any, out: str | None, header: list[str]) -> None:
    rows = np.asarray(rows)
    if out and out.endswith(".npy"):
        np.save(out, rows, allow_pickle=False)
        return
    fh = open(out, "w") if out else sys.stdout  # noqa: SIM115 - closed below unless stdout
    try:
        fh.write(",".join(header) + "\n")
        np.savetxt(fh, rows, delimiter=",", fmt="%.9g")
    finally:
        if out:
            fh.close()


def run_sample(args: argparse.Namespace) -> int:
    context = None
    if args.context:
        context = np.asarray([[float(v) for v in args.context.split(",")]])
    columns = target_log_prob = diagnostics = None
    if args.url:
        try:
            with Client(args.url, api_key=args.api_key) as c:
                d = c.draws(args.name, args.n, seed=args.seed, context=context,
                            version=args.version, diagnose=args.diagnose)
        except NFServeError as e:
            raise CommandError(f"{e.status_code}: {e.detail}") from None
        x, log_q, columns, target_log_prob = d.samples, d.log_prob, d.columns, d.target_log_prob
        diagnostics = d.diagnostics
    else:
        import torch

        import nfcore

        from ..inference.constrained import target_of
        from ..store import ModelNotFound, ModelStore

        store = ModelStore(load_settings(models_dir=args.models_dir).models_dir)
        try:
            version = store.resolve(args.name, args.version)
            flow = nfcore.load(store.path(args.name, version))
            gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
            target = target_of(flow.metadata, flow.dim)
            with torch.inference_mode():
                xs, lq = flow.sample_and_log_prob(args.n, context=context, generator=gen)
                if target is not None:  # a model-language fit: its named, constrained columns
                    d = target.draws(xs.double(), lq.double())
                    xs, lq, columns = d.samples, d.log_prob, d.columns
                    target_log_prob = d.target_log_prob.numpy()
            if args.diagnose:
                from ..inference.constrained import builtin_target_of, diagnose

                builtin = None if target is not None else builtin_target_of(flow.metadata,
                                                                            flow.dim)
                if target is None and builtin is None:
                    raise CommandError(f"--diagnose: model {args.name!r} was not fit to a "
                                       "target (a model-language one, or a built-in one by "
                                       "name); there is nothing to weigh its draws against")
                diagnostics = diagnose(xs, lq, target_log_prob, builtin=builtin)
        except (ModelNotFound, nfcore.NFCoreError, ValueError) as e:
            raise CommandError(str(e)) from None
        x, log_q = xs.double().numpy(), lq.double().numpy()
    header = (columns or [f"x{i}" for i in range(x.shape[1])]) + ["log_prob"]
    rows = [x, log_q]
    if target_log_prob is not None:
        header.append("target_log_prob")
        rows.append(target_log_prob)
    _write_rows(np.column_stack(rows), args.out, header)
    if diagnostics is not None:  # beside the samples, not in them: stdout may be the CSV
        print(json.dumps({"diagnostics": diagnostics}), file=sys.stderr)
    return 0


def add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subcommand(subparsers, "sample", "draw samples from a model",
                   "Draw samples and their log density from a model in the local store (or a "
                   "server with --url); writes CSV (x0, x1, …, log_prob) or .npy. A model fit to "
                   "a model-language target gives its named, constrained columns, log_prob (log "
                   "q there) and target_log_prob.",
                   guard(run_sample))
    p.add_argument("name", help="model name")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--version", type=int, default=None, help="model version (default latest)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--context", default=None, help="comma-separated context (conditional models)")
    p.add_argument("--out", default=None, help="output file (.csv or .npy); default stdout CSV")
    p.add_argument("--url", default=None, help="ask this server instead of the local store")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.add_argument("--diagnose", action="store_true",
                   help="also print these draws' importance diagnostics against the target "
                        "the model was fit to (k̂, ESS, verdict) as JSON on stderr; n >= 100")


# ---------------------------------------------------------------------- models
def run_models(args: argparse.Namespace) -> int:
    if args.url:
        try:
            with Client(args.url, api_key=args.api_key) as c:
                rows = [{"name": m["name"], "versions": m.get("versions"), "dim": m.get("dim")}
                        for m in c.models()]
        except NFServeError as e:
            raise CommandError(f"{e.status_code}: {e.detail}") from None
    else:
        from ..store import ModelStore

        store = ModelStore(load_settings(models_dir=args.models_dir).models_dir)
        rows = []
        for name in store.names():
            versions = store.versions(name)
            info = store.info(name, versions[-1])
            rows.append({"name": name, "versions": versions, "dim": info.spec.get("dim"),
                         "created": info.created.isoformat()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("(no models)")
    for r in rows:
        versions = ",".join(str(v) for v in r["versions"] or [])
        print(f"{r['name']:<32} dim {r['dim']!s:<5} versions {versions}")
    return 0


def add_models(subparsers: argparse._SubParsersAction) -> None:
    p = subcommand(subparsers, "models", "list the models and their versions",
                   "List the models of the local store (or a server).", guard(run_models))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--url", default=None, help="ask this server instead of the local store")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")

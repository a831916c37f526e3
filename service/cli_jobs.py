"""``nfserve worker``, ``train``, ``sample`` and ``models``: the job and model subcommands.

``train`` runs locally, in this process, with a progress bar, and publishes the result into the
model store (``NFSERVE_MODELS_DIR``) exactly as a worker would, so a running server serves it at
once. ``sample`` and ``models`` read the local store, or a server with ``--url``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_worker", "add_train", "add_sample", "add_models", "COMMANDS"]


class CommandError(Exception):
    """A user error: printed as ``nfserve: error: …`` with exit status 2."""


def _guard(func: Any) -> Any:
    """Print a ``CommandError`` as ``nfserve CMD: error: …`` and exit with status 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as e:
            print(f"nfserve {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


def _settings(**overrides: Any) -> Any:
    from .settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _json_arg(value: str, what: str) -> Any:
    text = Path(value).read_text() if not value.lstrip().startswith(("{", "[")) else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"{what}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------- worker
def run_worker_command(args: argparse.Namespace) -> int:
    import logging

    from .worker import check_worker, run_worker

    settings = _settings(worker_threads=args.threads, device=args.device,
                         models_dir=args.models_dir, data_dir=args.data_dir)
    if args.check:
        problems = check_worker(settings)
        for problem in problems:
            print(f"nfserve worker: {problem}", file=sys.stderr)
        return 1 if problems else 0
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d] "
                               "%(message)s")
    run_worker(settings, parent_pid=args.parent_pid)
    return 0


def add_worker(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker", help="run a training worker",
        description="Consume training jobs from the queue (Huey, thread workers; one process per "
                    "GPU), beat heartbeats, and re-queue the jobs of workers that died. SIGTERM "
                    "hands running jobs back to the queue.")
    p.add_argument("--threads", type=int, default=None,
                   help="jobs run at once in this process (NFSERVE_WORKER_THREADS, default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (NFSERVE_DEVICE)")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.add_argument("--data-dir", default=None, help="datasets, checkpoints (NFSERVE_DATA_DIR)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--check", action="store_true",
                   help="only check that the job store, queue and model store are reachable "
                        "(exit 0) or not (exit 1): the container health check")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_worker_command)


# ---------------------------------------------------------------------- train
def _default_flow(args: argparse.Namespace, dim: int) -> dict[str, Any]:
    if args.flow:
        return _json_arg(args.flow, "--flow")
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    return {"preset": args.preset, "dim": dim, "transforms": args.transforms, "hidden": hidden}


def run_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import nfcore
    from nfcore.errors import NFCoreError, TrainingCancelled

    from .datasets import parse_upload
    from .errors import ServiceError
    from .jobs import build_target
    from .store import ModelStore
    from .worker import load_plugins

    settings = _settings(models_dir=args.models_dir, device=args.device)
    load_plugins(settings)
    sources = [s for s in (args.data, args.target, args.expression) if s]
    if len(sources) != 1:
        raise CommandError("give exactly one of --data FILE, --target NAME or --expression EXPR")
    try:
        store = ModelStore(settings.models_dir)
        store.check_name(args.name)
        if args.data:
            path = Path(args.data)
            parsed = parse_upload(path.read_bytes(), filename=path.name)
            spec = nfcore.normalize_spec(_default_flow(args, parsed.dim))
            target = None
        else:
            if args.target:
                target_spec: dict[str, Any] = {"builtin": args.target,
                                               "options": _json_arg(args.target_options,
                                                                    "--target-options")}
            else:
                if args.dim is None:
                    raise CommandError("--expression needs --dim")
                target_spec = {"dim": args.dim, "log_prob": args.expression,
                               "constants": _json_arg(args.constants, "--constants")}
            target = build_target(target_spec)
            spec = nfcore.normalize_spec(_default_flow(args, target.dim))
    except (OSError, ServiceError, NFCoreError, ValueError) as e:
        raise CommandError(getattr(e, "detail", None) or str(e)) from None

    torch.manual_seed(args.seed)
    flow = nfcore.build(spec).to(settings.resolved_device)
    stopping = {"now": False}
    steps = args.steps if args.steps is not None else (None if args.epochs else 1000)
    bar = tqdm(total=steps, unit="step", dynamic_ncols=True, disable=args.quiet,
               desc=args.name)

    def progress(p: Any) -> None:
        bar.total = p.total
        bar.n = p.step
        post = {"loss": f"{p.loss:.4f}" if p.loss is not None else "-"}
        if p.val_loss is not None:
            post["val"] = f"{p.val_loss:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    common = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "max_seconds": args.max_seconds, "callback": progress,
              "should_stop": lambda: stopping["now"]}
    try:
        if target is None:
            budget = {"epochs": args.epochs} if args.epochs else {"steps": steps}
            result = nfcore.fit_density(flow, parsed.x, context=parsed.context,
                                        validation_fraction=args.validation_fraction,
                                        **budget, **common)
        else:
            result = nfcore.fit_target(flow, target, steps=steps,
                                       anneal_steps=args.anneal_steps or 0, **common)
    except KeyboardInterrupt:
        bar.close()
        print("nfserve: interrupted; nothing was published", file=sys.stderr)
        return 130
    except TrainingCancelled:
        bar.close()
        return 130
    except (NFCoreError, ValueError) as e:
        bar.close()
        raise CommandError(str(e)) from None
    bar.close()
    meta = {"training": result.summary, "source": "nfserve train"}
    version = store.publish(args.name, result.flow.cpu(), meta)
    _record_model(settings, store, args.name, version, result.summary)
    summary = result.summary
    loss = summary.get("val_loss") if summary.get("val_loss") is not None else summary.get("loss")
    print(f"{args.name} version {version}: {summary.get('steps')} steps, loss {loss}, "
          f"{store.path(args.name, version)}")
    return 0


def _record_model(settings: Any, store: Any, name: str, version: int, summary: dict) -> None:
    """Add the version to the job store's models table, when that database is reachable."""
    import nfcore

    from .db import Database
    from .tasks import record_model

    try:
        db = Database.from_settings(settings)
        db.create_all()
        path = store.path(name, version)
        record_model(db, name=name, version=version, path=path, summary=summary,
                     content_hash=nfcore.read_metadata(path).get("nfcore.content_hash"))
        db.dispose()
    except Exception as e:
        print(f"nfserve: warning: model saved, but not recorded in the job store ({e})",
              file=sys.stderr)


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a flow here, with a progress bar, into the model store",
        description="Train a flow locally and publish it as the next version of NAME in the model "
                    "store. Data: --data FILE (CSV, .npy or safetensors). Or a target for "
                    "variational fitting: --target U1 (built-in or plugin) or --expression "
                    "'-0.5*sum(z**2)' --dim 2.")
    p.add_argument("name", help="model name")
    src = p.add_argument_group("what to fit (one of)")
    src.add_argument("--data", help="CSV, .npy or safetensors file of training rows")
    src.add_argument("--target", help="built-in or plugin target (U1-U4, banana, funnel, …)")
    src.add_argument("--target-options", default="{}", help="JSON options of --target")
    src.add_argument("--expression", help="log-density expression in z (write --expression=EXPR "
                                          "when it starts with a minus sign)")
    src.add_argument("--dim", type=int, help="dimension of z for --expression")
    src.add_argument("--constants", default="{}", help="JSON constants of --expression")
    arch = p.add_argument_group("flow")
    arch.add_argument("--flow", help="flow spec as JSON, or a JSON file (default: a preset)")
    arch.add_argument("--preset", default="nsf", help="preset when --flow is not given")
    arch.add_argument("--transforms", type=int, default=5, help="preset transforms")
    arch.add_argument("--hidden", default="64,64", help="preset hidden widths, comma-separated")
    opt = p.add_argument_group("training")
    opt.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    opt.add_argument("--epochs", type=int, default=None, help="epochs instead of steps (data)")
    opt.add_argument("--batch-size", type=int, default=256)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--max-seconds", type=float, default=None)
    opt.add_argument("--validation-fraction", type=float, default=0.1)
    opt.add_argument("--anneal-steps", type=int, default=None)
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (NFSERVE_DEVICE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard(run_train))


# ---------------------------------------------------------------------- sample
def _write_rows(rows: Any, out: str | None, header: list[str]) -> None:
    import numpy as np

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
    import numpy as np

    context = None
    if args.context:
        context = np.asarray([[float(v) for v in args.context.split(",")]])
    if args.url:
        from .client import Client, NFServeError

        try:
            with Client(args.url, api_key=args.api_key) as c:
                x, log_q = c.sample(args.name, args.n, seed=args.seed, context=context,
                                    version=args.version)
        except NFServeError as e:
            raise CommandError(f"{e.status_code}: {e.detail}") from None
    else:
        import torch

        import nfcore

        from .store import ModelNotFound, ModelStore

        store = ModelStore(_settings(models_dir=args.models_dir).models_dir)
        try:
            version = store.resolve(args.name, args.version)
            flow = nfcore.load(store.path(args.name, version))
            gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
            with torch.inference_mode():
                xs, lq = flow.sample_and_log_prob(args.n, context=context, generator=gen)
        except (ModelNotFound, nfcore.NFCoreError) as e:
            raise CommandError(str(e)) from None
        x, log_q = xs.double().numpy(), lq.double().numpy()
    header = [f"x{i}" for i in range(x.shape[1])] + ["log_prob"]
    _write_rows(np.column_stack([x, log_q]), args.out, header)
    return 0


def add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="draw samples from a model",
        description="Draw samples and their log density from a model in the local store (or a "
                    "server with --url); writes CSV (x0, x1, …, log_prob) or .npy.")
    p.add_argument("name", help="model name")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--version", type=int, default=None, help="model version (default latest)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--context", default=None, help="comma-separated context (conditional models)")
    p.add_argument("--out", default=None, help="output file (.csv or .npy); default stdout CSV")
    p.add_argument("--url", default=None, help="ask this server instead of the local store")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.set_defaults(func=_guard(run_sample))


# ---------------------------------------------------------------------- models
def run_models(args: argparse.Namespace) -> int:
    if args.url:
        from .client import Client, NFServeError

        try:
            with Client(args.url, api_key=args.api_key) as c:
                rows = [{"name": m["name"], "versions": m.get("versions"), "dim": m.get("dim")}
                        for m in c.models()]
        except NFServeError as e:
            raise CommandError(f"{e.status_code}: {e.detail}") from None
    else:
        from .store import ModelStore

        store = ModelStore(_settings(models_dir=args.models_dir).models_dir)
        rows = []
        for name in store.names():
            versions = store.versions(name)
            info = store.info(name, versions[-1])
            spec = json.loads(info.metadata.get("nfcore.spec", "{}"))
            rows.append({"name": name, "versions": versions, "dim": spec.get("dim"),
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
    p = subparsers.add_parser("models", help="list the models and their versions",
                              description="List the models of the local store (or a server).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--url", default=None, help="ask this server instead of the local store")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.set_defaults(func=_guard(run_models))


COMMANDS = [add_worker, add_train, add_sample, add_models]

"""``nfserve train``: train a flow here, with a progress bar, and publish it into the model store.

It takes the same path as a worker's job (``service.training.runner``), with the same checks,
options, defaults and budget rules (``service.training.requests``), so a running server serves the
new version at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import CommandError, guard, json_arg, subcommand
from .common import settings as load_settings

__all__ = ["add_train"]


def _flow(args: argparse.Namespace, dim: int) -> dict[str, Any]:
    if args.flow:
        return json_arg(args.flow, "--flow")
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    return {"preset": args.preset, "dim": dim, "transforms": args.transforms, "hidden": hidden}


def _training(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (the others take their defaults)."""
    given = {"steps": args.steps, "epochs": args.epochs, "max_seconds": args.max_seconds,
             "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "validation_fraction": args.validation_fraction, "anneal_steps": args.anneal_steps}
    return {k: v for k, v in given.items() if v is not None}


def _report(name: str, version: int, summary: dict[str, Any], path: Path) -> None:
    from ..training.runner import diagnostics

    loss = summary.get("val_loss") if summary.get("val_loss") is not None else summary.get("loss")
    print(f"{name} version {version}: {summary.get('steps')} steps, loss {loss}, {path}")
    found = diagnostics(summary)
    if found is not None:
        print(f"diagnostics: {found.get('verdict')}")
        for reason in found.get("reasons") or []:
            print(f"  - {reason}")


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nfcore import targets
    from nfcore.errors import NFCoreError, TrainingCancelled

    from ..errors import ServiceError
    from ..store import ModelStore
    from ..training import runner
    from ..training.datasets import parse_upload
    from ..training.requests import (
        check_data,
        checked_spec,
        checked_target,
        fit_options,
        load_plugins,
        planned_steps,
    )

    settings = load_settings(models_dir=args.models_dir, device=args.device)
    if len([s for s in (args.data, args.target, args.expression) if s]) != 1:
        raise CommandError("give exactly one of --data FILE, --target NAME or --expression EXPR")
    training = _training(args)
    data = target = None
    rows = None
    try:
        load_plugins(settings)
        store = ModelStore(settings.models_dir)
        store.check_name(args.name)
        if args.data:
            path = Path(args.data)
            parsed = parse_upload(path.read_bytes(), filename=path.name)
            kind, spec = "density", checked_spec(_flow(args, parsed.dim))
            check_data(parsed.rows, parsed.dim, parsed.context_dim, spec)
            data, rows = (parsed.x, parsed.context), parsed.rows
        else:
            if args.target:
                target_spec: dict[str, Any] = {
                    "builtin": args.target,
                    "options": json_arg(args.target_options, "--target-options")}
            elif args.dim is None:
                raise CommandError("--expression needs --dim")
            else:
                target_spec = {"dim": args.dim, "log_prob": args.expression,
                               "constants": json_arg(args.constants, "--constants")}
            dim = targets.from_spec(target_spec).dim
            kind, spec = "variational", checked_spec(_flow(args, dim))
            target = checked_target(target_spec, spec)
        fit_options(kind, training)
    except (OSError, ServiceError, NFCoreError, ValueError) as e:
        raise CommandError(getattr(e, "detail", None) or str(e)) from None

    bar = tqdm(total=planned_steps(kind, training, rows), unit="step", dynamic_ncols=True,
               disable=args.quiet, desc=args.name)

    def progress(p: Any) -> None:
        bar.total = p.total
        bar.n = p.step
        post = {"loss": f"{p.loss:.4f}" if p.loss is not None else "-"}
        if p.val_loss is not None:
            post["val"] = f"{p.val_loss:.4f}"
        if p.total is None and p.eta is not None:  # a time budget: show what is left of it
            post["left"] = f"{p.eta:.0f}s"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    try:
        result = runner.fit(kind, spec, training, data=data, target=target,
                            device=settings.resolved_device, callback=progress)
    except KeyboardInterrupt:
        print("nfserve: interrupted; nothing was published", file=sys.stderr)
        return 130
    except TrainingCancelled:
        return 130
    except (NFCoreError, ValueError) as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    version = runner.publish(store, args.name, result, source="nfserve train")
    _report(args.name, version, result.summary, store.path(args.name, version))
    return 0


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subcommand(
        subparsers, "train", "train a flow here, with a progress bar, into the model store",
        "Train a flow locally and publish it as the next version of NAME in the model store. "
        "Data: --data FILE (CSV, .npy or safetensors). Or a target for variational fitting: "
        "--target U1 (built-in or plugin) or --expression '-0.5*sum(z**2)' --dim 2. Budget: "
        "--max-seconds alone trains until the time runs out or early stopping; --steps (or "
        "--epochs) alone trains that many steps; both: whichever comes first; neither: nfcore's "
        "default step count (nfcore.train.DEFAULT_STEPS).", guard(run_train))
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
    opt = p.add_argument_group("training (options left out take nfcore's defaults)")
    opt.add_argument("--steps", type=int, default=None, help="optimizer steps")
    opt.add_argument("--epochs", type=int, default=None, help="epochs instead of steps (data)")
    opt.add_argument("--max-seconds", type=float, default=None, help="time budget in seconds")
    opt.add_argument("--batch-size", type=int, default=None, help="rows or samples per step")
    opt.add_argument("--lr", type=float, default=None, help="learning rate")
    opt.add_argument("--seed", type=int, default=None, help="seed of weights, split and batches")
    opt.add_argument("--validation-fraction", type=float, default=None,
                     help="held-out share of the data (data)")
    opt.add_argument("--anneal-steps", type=int, default=None,
                     help="steps over which the target's weight rises to 1 (target)")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (NFSERVE_DEVICE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

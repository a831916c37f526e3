"""``nfserve worker``: a training worker process, or ``--check`` for the container health check."""

from __future__ import annotations

import argparse
import logging
import sys

from .common import settings as load_settings
from .common import subcommand

__all__ = ["add_worker"]


def run_worker_command(args: argparse.Namespace) -> int:
    from ..training.worker import check_worker, run_worker

    settings = load_settings(worker_threads=args.threads, device=args.device,
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
    p = subcommand(subparsers, "worker", "run a training worker",
                   "Consume training jobs from the queue (Huey, thread workers; one process per "
                   "GPU), beat heartbeats, and re-queue the jobs of workers that died. SIGTERM "
                   "hands running jobs back to the queue.", run_worker_command)
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

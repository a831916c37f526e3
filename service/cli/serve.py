"""``nfserve serve``: the HTTP API under uvicorn, with one supervised training worker beside it."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .common import settings as load_settings
from .common import subcommand

__all__ = ["add_serve"]


def run_serve(args: argparse.Namespace) -> int:
    """Run the API with uvicorn; in embedded mode, keep one worker process alive beside it."""
    import uvicorn

    from ..api import create_app
    from ..training.supervisor import EmbeddedWorker

    settings = load_settings(host=args.host, port=args.port, models_dir=args.models_dir)
    worker = EmbeddedWorker(settings).start() if settings.embedded_worker else None
    if worker is not None:
        # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so the
        # finally below waits for the worker to hand its running job back before we exit.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level=args.log_level, access_log=args.access_log)
    finally:
        if worker is not None:
            worker.stop()
    return 0


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subcommand(subparsers, "serve", "run the HTTP API (and one worker)",
                   "Run the HTTP API (uvicorn) on the model store, plus one training worker "
                   "process, restarted if it dies, unless NFSERVE_EMBEDDED_WORKER=false.",
                   run_serve)
    p.add_argument("--host", default=None, help="bind address (NFSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (NFSERVE_PORT, default 8000)")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.add_argument("--log-level", default=os.environ.get("NFSERVE_LOG_LEVEL", "info"),
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log every request")

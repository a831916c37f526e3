"""``nfserve`` command line. One function per subcommand, registered in ``COMMANDS``.

Adding a subcommand: write ``add_<name>(subparsers)`` that defines its parser and sets
``func=<handler>``, and append it to ``COMMANDS``. Every setting can also come from its
``NFSERVE_<NAME>`` environment variable; flags override them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from .cli_jobs import COMMANDS as JOB_COMMANDS

__all__ = ["main", "build_parser", "COMMANDS"]


def run_serve(args: argparse.Namespace) -> int:
    """Run the API with uvicorn."""
    import uvicorn

    from .app import create_app
    from .settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                   "models_dir": args.models_dir}.items() if v is not None}
    settings = Settings(**overrides)
    # Embedded mode: one worker process beside the API, so one command gives a service that trains.
    from .worker import start_embedded_worker, stop_embedded_worker

    worker = start_embedded_worker(settings) if settings.embedded_worker else None
    if worker is not None:
        # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so the
        # finally below waits for the worker to hand its running job back before we exit.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level=args.log_level, access_log=args.access_log)
    finally:
        if worker is not None:
            stop_embedded_worker(worker)
    return 0


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP API (and one worker)",
                              description="Run the HTTP API (uvicorn) on the model store, plus "
                                          "one training worker process unless "
                                          "NFSERVE_EMBEDDED_WORKER=false.")
    p.add_argument("--host", default=None, help="bind address (NFSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (NFSERVE_PORT, default 8000)")
    p.add_argument("--models-dir", default=None, help="model store (NFSERVE_MODELS_DIR)")
    p.add_argument("--log-level", default=os.environ.get("NFSERVE_LOG_LEVEL", "info"),
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log every request")
    p.set_defaults(func=run_serve)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve,
    *JOB_COMMANDS,  # worker, train, sample, models
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfserve", description="Normalizing-flow service.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

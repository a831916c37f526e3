"""``nfserve`` command line: one module per subcommand, registered in ``COMMANDS``.

Adding a subcommand: write ``add_<name>(subparsers)`` that defines its parser and sets
``func=<handler>``, and append it to ``COMMANDS``. Every setting can also come from its
``NFSERVE_<NAME>`` environment variable; flags override them. The heavy imports (torch, the
server) happen inside the handlers, so ``nfserve --help`` is quick and the ``--url`` commands work
with the client alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .models import add_models, add_sample
from .serve import add_serve
from .train import add_train
from .worker import add_worker

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve, add_worker, add_train, add_sample, add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfserve", description="Normalizing-flow service.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)

"""What every subcommand shares: user errors as exit status 2, settings from flags over the
environment, and JSON arguments given inline or as a file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["CommandError", "guard", "settings", "json_arg", "subcommand"]


class CommandError(Exception):
    """A user error: printed as ``nfserve CMD: error: …`` with exit status 2."""


def guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a ``CommandError`` as ``nfserve CMD: error: …`` and exit with status 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as e:
            print(f"nfserve {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


def settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment, with the flags that were given on top."""
    from ..settings import Settings  # the server's settings: not needed by --url commands

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def json_arg(value: str, what: str) -> Any:
    """``value`` as JSON: inline (``{…}`` or ``[…]``) or the path of a JSON file."""
    try:
        text = Path(value).read_text() if not value.lstrip().startswith(("{", "[")) else value
        return json.loads(text)
    except OSError as e:
        raise CommandError(f"{what}: cannot read {value!r} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CommandError(f"{what}: not valid JSON ({e})") from None


def subcommand(subparsers: argparse._SubParsersAction, name: str, summary: str,
               description: str, run: Callable[[argparse.Namespace], int]
               ) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``, which runs ``run`` (``summary`` in ``nfserve --help``)."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    parser.set_defaults(func=run)
    return parser

"""The ``lesionserve`` command: ``serve`` a model; ``classify`` files and folders; ``models`` and ``health``.

Each subcommand builds its one settings object from its flags over ``LESIONSERVE_*`` over the defaults
(:class:`service.config.Settings` for ``serve``, :class:`service.config.ClientSettings` for the clients).
``--help`` works everywhere without a model; an unknown argument is an error (exit 2), never ignored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pydantic import ValidationError

from service.cli import classify, serve, status
from service.config import describe_validation_error

Command = Callable[[argparse.Namespace], int]


def build_parser(prog: str = "lesionserve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a lesion classifier, classify files and folders through one, ask what it serves."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    table: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Command]] = [
        ("serve", "Serve a model (what `make run` runs).", serve.add_parser, serve.run),
        ("classify", "Classify image files and folders into a CSV or JSONL file.", classify.add_parser, classify.run),
        ("models", "Show what a server has loaded.", status.add_models_parser, status.models),
        ("health", "Say whether a server is alive and ready (exit 0 when ready).", status.add_health_parser,
         status.health),
    ]  # fmt: skip
    for name, help_text, add, run in table:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lesionserve COMMAND ...`` (argv: default ``sys.argv[1:]``); the command's exit status."""
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except ValidationError as exc:  # a flag or LESIONSERVE_* variable refused: one line, no traceback
        print(f"lesionserve: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return 2


def serve_main(argv: list[str] | None = None, prog: str = "python -m service") -> int:
    """``python -m service [FLAGS]``: the serve command alone, under its own name."""
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model (the same as `lesionserve serve`).")
    serve.add_parser(parser)
    return serve.run(parser.parse_args(argv))

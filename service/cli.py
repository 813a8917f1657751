"""The `tsad` command line: one subcommand per module, each registering its own parser.

It lives in the service, the layer that may use both packages: the server's commands and
the ML core's (``models`` never imports ``service``). Subcommand modules stay light at
import time; heavy imports (torch, the server) happen when a command runs, so `tsad
--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from models import evaluate_cli, train_cli
from models.lm import embed_cli
from service import demo, receiver, replay, serve
from service.auth import cli as keys_cli

# each exposes register(subparsers); the parser's `func` runs the command
SUBCOMMANDS = (serve, keys_cli, replay, demo, receiver, embed_cli, evaluate_cli, train_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsad",
        description="Streaming time-series anomaly detection with language-model features.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from service.redaction import guard_output

    guard_output()  # no password or key of a URL or the environment in anything printed
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except FileNotFoundError as exc:  # missing data or inputs: one line, not a traceback
        if args.verbose:
            raise
        print(f"tsad {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

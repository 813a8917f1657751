"""The `tsad` command line: one subcommand per module, each registering its own parser.

Subcommand modules stay light at import time; heavy imports (torch, the server) happen when
a command runs, so `tsad --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module path -> each exposes register(subparsers); the parser's `func` runs the command.
SUBCOMMAND_MODULES = [
    "service.cli",  # serve
    "service.auth.cli",  # keys
    "service.replay",  # replay
    "service.demo",  # demo
    "service.receiver",  # receive
    "models.lm.embed_cli",  # embed
    "models.evaluate_cli",  # evaluate
    "models.train_cli",  # train
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsad",
        description="Streaming time-series anomaly detection with language-model features.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency, not an absent module
                raise
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

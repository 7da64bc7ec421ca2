"""The ``bitalloc`` command line. One file per command in this package; each has ``register(subparsers)``.

A command module's ``register`` adds its sub-parser and sets ``func`` (called with the parsed args, returns
an exit code). Errors derived from :class:`bitalloc.errors.BitallocError` are printed as one clear line
(exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order here is the order in ``bitalloc --help``.
COMMANDS = ["demo", "train", "freeze", "ptq", "sensitivity", "cost", "pack", "unpack", "sweep", "export", "bench", "codec"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitalloc",
        description="Decide how many bits each layer and channel of a network gets; quantize, measure and ship it.",
    )
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"bitalloc.cli.{name.replace('-', '_')}").register(sub)
    from bitalloc.cli.common import track_given

    return track_given(parser)


def main(argv: list[str] | None = None) -> int:
    from bitalloc.errors import BitallocError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BitallocError as exc:
        if args.verbose:
            raise
        print(f"bitalloc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if args.verbose:
            raise
        print(f"bitalloc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

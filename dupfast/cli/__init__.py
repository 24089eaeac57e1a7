"""`dupfast` command line. Each subcommand lives in its own module exposing
`add_parser(subparsers)` (which sets `func` via set_defaults) and is listed in _COMMANDS."""
import argparse
import importlib
import sys

_COMMANDS = ("demo", "detect", "purify", "btu", "generative")


def build_parser():
    parser = argparse.ArgumentParser(prog="dupfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"dupfast.cli.{name}").add_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"dupfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`dupfast` command line. Each subcommand lives in its own module exposing
`add_parser(subparsers)` (which sets `func` via set_defaults) and is listed in _COMMANDS."""
import argparse
import errno
import importlib
import sys

_COMMANDS = ("demo", "detect", "purify", "btu", "generative")


def build_parser():
    parser = argparse.ArgumentParser(prog="dupfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"dupfast.cli.{name}").add_parser(sub)
    return parser


_OS_FIXES = {errno.ENOSPC: "free some disk space, or choose another --out",
             errno.EDQUOT: "free some of your disk quota, or choose another --out",
             errno.EACCES: "check its permissions, or choose another path",
             errno.EPERM: "check its permissions, or choose another path",
             errno.EROFS: "the file system is read-only: choose another path",
             errno.EISDIR: "a folder is where a file should be: choose another path",
             errno.ENOTDIR: "a file is where a folder should be: choose another path",
             errno.ENOENT: "check the path"}


def describe(exc: BaseException) -> str:
    """One line for a user error; an OSError from the system (no message of ours) names the path and a fix."""
    if isinstance(exc, OSError) and exc.errno is not None:
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        fix = _OS_FIXES.get(exc.errno, "check the path, its permissions and the free disk space")
        return f"{exc.strerror or exc}{': ' + paths if paths else ''} ({fix})"
    return str(exc)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    # user errors: bad input (ValueError) or a path that cannot be read or written (OSError: FileNotFoundError,
    # PermissionError, IsADirectoryError, a full disk). KeyError is not one: no command raises it on purpose, so
    # one is a bug and keeps its traceback.
    except (ValueError, OSError) as exc:
        print(f"dupfast {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

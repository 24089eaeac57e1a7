"""`dupfast` command line. Each subcommand lives in its own module exposing
`add_parser(subparsers)` (which sets `func` via set_defaults) and is listed in _COMMANDS. A subcommand's parser
takes `example="dupfast ..."` (one command line, shown in its --help and in the top-level help's command list)
and `argtypes.add_progress_flags(parser)` (the --progress/--quiet pair, switched in main)."""
import argparse
import contextlib
import errno
import importlib
import sys

from .argtypes import HelpFormatter, add_progress_flags, progress_bars, progress_wanted

_COMMANDS = ("demo", "detect", "screen", "purify", "btu", "generative")


DESCRIPTION = """\
dupfast finds and removes backdoors in transformer text classifiers (and causal LMs): screen a data set
for trigger-carrying rows (DUP detection, one forward pass), purify a backdoored model (detection-guided
LoRA unlearning), or fine-tune defensively on data that may be poisoned (Backdoor Token Unlearning, BTU)."""


class Parser(argparse.ArgumentParser):
    """The top-level parser and (add_subparsers uses the parent's class) every subcommand's: defaults shown in
    --help, description line breaks kept; `example` is one command line, shown under the options."""

    def __init__(self, *args, example=None, formatter_class=HelpFormatter, **kwargs):
        if example and kwargs.get("epilog") is None:
            kwargs["epilog"] = f"example:\n  {example}"
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.example = example


def version() -> str:
    """The installed distribution's version, else the package's own (a source tree on sys.path)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("dupfast")
    except PackageNotFoundError:
        import dupfast
        return getattr(dupfast, "__version__", "unknown")


def _example(name, parser, doc) -> str:
    """A command's example: its parser's `example`, else the first `dupfast NAME ...` line of its description or
    of its module's docstring `doc`, else `dupfast NAME --help`."""
    if getattr(parser, "example", None):
        return parser.example
    lines = [line.strip() for text in (parser.description, doc) for line in (text or "").splitlines()]
    return next((line for line in lines if line.startswith(f"dupfast {name} ")), f"dupfast {name} --help")


def _command_list(sub, docs) -> str:
    """Every registered subcommand (iterated, so a new one appears by itself): name, one-line help, example.
    docs: subcommand name -> its module's docstring."""
    # _choices_actions holds one entry per subcommand with its help (choices also maps aliases)
    entries = [(a.dest, a.help or "", _example(a.dest, sub.choices[a.dest], docs.get(a.dest)))
               for a in sub._choices_actions]
    width = max(len(name) for name, _, _ in entries) + 4
    lines = ["commands:"]
    for name, text, example in entries:
        lines += [f"  {name:<{width - 2}}{text}", f"{'':<{width}}e.g. {example}"]
    return "\n".join(lines + ["", "Each command's options and their defaults: dupfast COMMAND --help"])


def build_parser():
    parser = Parser(prog="dupfast", description=DESCRIPTION, usage="dupfast [-h] [--version] COMMAND ...")
    parser.add_argument("--version", action="version", version=f"dupfast {version()}")
    # not required: `dupfast` alone prints this help (main); the listing is the epilog, with examples
    sub = parser.add_subparsers(dest="command", prog="dupfast", metavar="COMMAND", help=argparse.SUPPRESS)
    docs = {}
    for name in _COMMANDS:
        module, before = importlib.import_module(f"dupfast.cli.{name}"), set(sub.choices)
        module.add_parser(sub)
        docs.update(dict.fromkeys(set(sub.choices) - before, module.__doc__))
    for p in {id(p): p for p in sub.choices.values()}.values():
        if "--quiet" not in p._option_string_actions:  # the same pair on every command, a new one included
            add_progress_flags(p)
    parser.epilog = _command_list(sub, docs)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `dupfast` alone: what it can do, not a usage error
        parser.print_help()
        return 0
    switch = contextlib.nullcontext()
    if hasattr(args, "quiet"):  # the --progress/--quiet pair: one bool for the command, bars switched for its run
        args.progress = progress_wanted(args)
        switch = progress_bars(args.progress, args.quiet)
    try:
        with switch:
            return args.func(args) or 0
    # user errors: bad input (ValueError) or a path that cannot be read or written (OSError: FileNotFoundError,
    # PermissionError, IsADirectoryError, a full disk). KeyError is not one: no command raises it on purpose, so
    # one is a bug and keeps its traceback.
    except (ValueError, OSError) as exc:
        print(f"dupfast {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""argparse pieces shared by the subcommands: number types (a bad number is an argument error: exit 2, the flag
named), the help formatter that shows defaults, and the --progress/--quiet pair with what it switches.

    add_progress_flags(parser)          # every command; main() resolves args.progress to a bool and runs the
                                        # command inside progress_bars(args.progress, args.quiet)
    info(args, "...")                   # an informational stderr line: silent under --quiet
    with_bar(batches, "pool")           # a tqdm bar each time the batches are read (off under DUPFAST_QUIET=1)
"""
import argparse
import contextlib
import os
import sys


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks (the usage lines in them); an option shows its default as
    with ArgumentDefaultsHelpFormatter, unless its help already says "default" (a default in words) or there is
    nothing to show (None, a switch's False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or not action.option_strings or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, (list, tuple)) and not d)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def synopsis(doc: str) -> str:
    """A subcommand's --help description: its module docstring's title line and usage lines (two paragraphs)."""
    return "\n\n".join(doc.split("\n\n")[:2])


def add_progress_flags(parser, default=None):
    """The same --progress/--quiet pair on every command. default: None shows bars when stderr is a terminal,
    False shows none unless --progress (the demo's one line per step)."""
    when = "when stderr is a terminal and DUPFAST_QUIET is not 1" if default is None else "off, one line per step"
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", action="store_true", default=default,
                       help=f"show progress bars on stderr (default: {when})")
    group.add_argument("--quiet", action="store_true",
                       help="no progress bars and no informational lines; results, the verdict and errors still "
                            "print")


def progress_wanted(args) -> bool:
    """--quiet: no bars; --progress: bars; else none under DUPFAST_QUIET=1, else the command's default."""
    if getattr(args, "quiet", False):
        return False
    if getattr(args, "progress", None):
        return True
    if os.environ.get("DUPFAST_QUIET") == "1":
        return False
    return sys.stderr.isatty() if getattr(args, "progress", None) is None else False


@contextlib.contextmanager
def progress_bars(enabled: bool, quiet: bool = False):
    """dupfast's tqdm bars (DUPFAST_QUIET) and transformers / huggingface_hub's on or off for the block; `quiet`
    also keeps transformers' info and warning logs off stderr. The previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    before_env, before_hf = os.environ.get("DUPFAST_QUIET"), hf_logging.is_progress_bar_enabled()
    before_level = hf_logging.get_verbosity()
    if enabled:
        os.environ.pop("DUPFAST_QUIET", None)  # an explicit --progress wins over an inherited DUPFAST_QUIET
        hf_logging.enable_progress_bar()
    else:
        os.environ["DUPFAST_QUIET"] = "1"
        hf_logging.disable_progress_bar()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop("DUPFAST_QUIET", None)
        else:
            os.environ["DUPFAST_QUIET"] = before_env
        (hf_logging.enable_progress_bar if before_hf else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(before_level)


def info(args, message: str) -> None:
    """An informational line on stderr (not a result, not an error): silent under --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


class with_bar:
    """`batches` (a list) read with a tqdm bar named `desc` on each pass, when dupfast's bars are on (not
    DUPFAST_QUIET=1) and `enabled` (e.g. rank 0 only); the library's own loaders stay silent."""

    def __init__(self, batches, desc: str, enabled: bool = True):
        self.batches, self.desc, self.enabled = batches, desc, enabled

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        if not self.enabled or os.environ.get("DUPFAST_QUIET") == "1":
            return iter(self.batches)
        from tqdm.auto import tqdm
        return iter(tqdm(self.batches, desc=self.desc, unit="batch", leave=False))

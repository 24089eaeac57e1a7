"""argparse pieces shared by the subcommands: number types (a bad number is an argument error: exit 2, the flag
named), the help formatter that shows defaults, and the --progress/--quiet pair with what it switches.

    add_progress_flags(parser)          # every command; main() resolves args.progress to a bool and runs the
                                        # command inside progress_bars(args.progress, args.quiet)
    info(args, "...")                   # an informational stderr line: silent under --quiet
    with_bar(batches, "pool")           # a tqdm bar each time the batches are read (off under DUPFAST_QUIET=1)

and --label-map, string labels to class ids, the same on every command that reads labels:

    add_label_map(parser)                                   # the option
    names, source = label_names(args.label_map, model_config(MODEL), MODEL)
    labels = label_ids(table, names, source, num_labels)     # read_table(..., raw_labels=True)'s labels as ids
"""
import argparse
import contextlib
import json
import os
import re
import sys
from typing import Optional


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


def add_threads(parser):
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's choice)")


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


# ---- labels: --label-map, or the model's config.label2id ------------------------------------------------------

def add_label_map(parser):
    parser.add_argument("--label-map", help="string labels to class ids, e.g. negative=0,positive=1 (default: the "
                                            "model's config.label2id)")


def parse_label_map(text: str) -> dict:
    """'neg=0,pos=1' -> {'neg': 0, 'pos': 1}."""
    out = {}
    for part in (p for p in text.split(",") if p.strip()):
        name, sep, value = part.rpartition("=")
        name = name.strip()
        if not sep or not name or not value.strip().isdigit():
            raise ValueError(f"--label-map takes NAME=ID pairs separated by commas, e.g. negative=0,positive=1; "
                             f"got {part!r}")
        if name in out:
            raise ValueError(f"--label-map names {name!r} twice: give each label one class id")
        out[name] = int(value)
    if not out:
        raise ValueError("--label-map is empty: give NAME=ID pairs, e.g. negative=0,positive=1")
    return out


def model_config(name_or_path) -> dict:
    """The config.json of a model folder (or a short name's): read before loading any weights."""
    from ..harness.models import resolve_model_dir
    return json.loads((resolve_model_dir(name_or_path) / "config.json").read_text())


def config_num_labels(config: dict) -> int:
    """A classifier's class count from its config.json."""
    return len(config.get("id2label") or {}) or config.get("num_labels") or 2


def label_names(label_map: Optional[str], config: dict, model) -> tuple:
    """(names -> class id, where they come from): --label-map when given, else the model's config.label2id."""
    if label_map:
        return parse_label_map(label_map), "--label-map"
    return {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}, f"{model}'s config.label2id"


def _integer(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def label_ids(data, names: dict, source: str, num_labels: Optional[int]) -> list:
    """A table's labels (`dupfast.tables.read_table(..., raw_labels=True)`: .labels, .path, .label_column) as class
    ids: a name in `names` (--label-map, or the model's label2id; exact, then ignoring case), else an integer.
    Unknown names and ids outside the model's classes are errors naming the fix."""
    folded = {str(k).casefold(): v for k, v in names.items()}
    out, unknown = [], []
    for value in data.labels:
        key = str(value).strip()
        if key in names:
            out.append(int(names[key]))
        elif _integer(value) is not None:
            out.append(_integer(value))
        elif key.casefold() in folded:
            out.append(int(folded[key.casefold()]))
        else:
            out.append(None)
            unknown.append(key)
    col = data.label_column
    if unknown:
        distinct = sorted(set(unknown))
        guess = ",".join(f"{n}={i}" for i, n in enumerate(sorted({str(v).strip() for v in data.labels})))
        raise ValueError(f"{data.path}: the labels in column {col!r} must be class ids or names the model knows; "
                         f"{', '.join(repr(u) for u in distinct[:5])} {'is' if len(distinct) == 1 else 'are'} neither "
                         f"(names from {source}: {sorted(names) or 'none'}); map them with --label-map, e.g. "
                         f"--label-map {guess} (each name = the model's class id for it)")
    bad = sorted({y for y in out if y < 0 or (num_labels is not None and y >= num_labels)})
    if bad:
        have = f"0..{num_labels - 1}" if num_labels else "ids >= 0"
        raise ValueError(f"{data.path}: label id(s) {bad[:5]} in column {col!r} are outside the model's classes "
                         f"({have}); check the labels, or map them with --label-map NAME=ID")
    return out

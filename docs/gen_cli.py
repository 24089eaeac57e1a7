"""The CLI reference, generated: every `dupfast <command> --help`, as argparse prints it today.

Used two ways:
- as a MkDocs hook (mkdocs.yml `hooks:`): at build time, the marker line `<!-- cli-help -->` in cli.md is
  replaced by the top-level help and one section per command, so the page can never fall behind the code;
- as a script, `python docs/gen_cli.py`: prints the same Markdown (to read it, or to diff it).

The parsers come from `dupfast.cli.build_parser()` (the same objects `dupfast` runs; no torch import), and
the help is formatted at a fixed width so the page does not depend on the terminal that builds it.
"""
import argparse
import os

MARKER = "<!-- cli-help -->"
WIDTH = "100"


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:  # argparse keeps its subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_markdown() -> str:
    from dupfast.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse's HelpFormatter reads the width from $COLUMNS
    try:
        parser = build_parser()
        parts = ["## `dupfast`", "", "```text", parser.format_help().rstrip(), "```"]
        for name, sub in _subcommands(parser).items():
            parts += ["", f"## `dupfast {name}`", "", "```text", sub.format_help().rstrip(), "```"]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown, page, config, files):  # MkDocs hook
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_markdown())


if __name__ == "__main__":
    print(cli_markdown(), end="")

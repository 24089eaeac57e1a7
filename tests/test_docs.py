"""The documentation: the site builds with `mkdocs build --strict` (no warning), the README stays short, and every
relative link of README.md and docs/ points to a file that exists."""
import argparse
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200
DOC_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")

# [text](target) and ![alt](target); the target ends at the first space (a "title" may follow) or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")


def _missing_doc_tools() -> list:
    missing = []
    for name in DOC_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is absent
            found = False
        if not found:
            missing.append(name)
    return missing


def _markdown_files() -> list:
    return [README] + sorted(DOCS.rglob("*.md"))


def _relative_links(path: pathlib.Path):
    """(line number, target) of every relative link outside code fences and code spans."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on the same page
            yield number, target


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, more than {MAX_README_LINES}: move the detail into docs/ (the site) "
        "and link to it")


def test_relative_links_point_to_existing_files():
    broken = []
    for path in _markdown_files():
        for number, target in _relative_links(path):
            file_part = target.split("#", 1)[0]
            if not file_part:
                continue
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_link_scanner_sees_links():
    """The scanner itself: README.md links into docs/, so finding none means the pattern broke."""
    targets = [t for _, t in _relative_links(README)]
    assert any(t.startswith("docs/") for t in targets), targets


def test_mkdocs_build_strict(tmp_path):
    missing = _missing_doc_tools()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must build the docs, but {', '.join(missing)} is not installed (make install installs "
                        "the doc tools: the Makefile's DOC_PACKAGES)")
        pytest.skip(f"the doc tools are not installed ({', '.join(missing)} missing): "
                    "pip install mkdocs mkdocs-material 'mkdocstrings[python]', or make install")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site),
                           "--config-file", str(ROOT / "mkdocs.yml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (site / "index.html").is_file()
    # the CLI reference is generated at build time: one section per command of the real parser
    from dupfast.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cli_page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    absent = [name for name in sub.choices if f'id="dupfast-{name}"' not in cli_page]
    assert not absent, f"the CLI reference lacks {absent}"
    # the API reference is generated from the docstrings
    api_page = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("dupfast.detection.detect", "dupfast.purification.purify", "dupfast.btu.train.train",
                 "dupfast.generative.detect_prompts"):
        assert f'id="{name}"' in api_page, name

"""The command line's help, --version, bare `dupfast`, and the --progress/--quiet pair (issue 28, CLI polish)."""
import argparse
import csv
import importlib.metadata
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

from dupfast.cli import DESCRIPTION, build_parser, main, version

# the commands the README documents; any command registered later must meet the same rules (they iterate)
DOCUMENTED = {"demo", "detect", "purify", "btu", "detect-prompts", "purify-generative"}
# a measured timing or speed-up: "195 s", "2.0x fp32", "12 seconds", "about 2 minutes", "measured ..."
TIMING = re.compile(r"\d[\d.,]*\s*(?:x\b|s\b|secs?\b|seconds?\b|mins?\b|minutes?\b|ms\b|hours?\b)|\bmeasured\b",
                    re.IGNORECASE)


def subcommands(parser=None):
    """name -> subparser, for every registered command (aliases once)."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: sub.choices[a.dest] for a in sub._choices_actions}


def flat(text: str) -> str:
    return " ".join(text.split())


def option_blocks(help_text: str) -> dict:
    """option string -> its help block (the option line and its wrapped continuation lines), whitespace folded."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            for opt in re.findall(r"(?:^|, )\s*(-{1,2}[\w-]+)", line):
                blocks[opt] = current
        elif current is not None and line.startswith("   ") and line.strip():
            current.append(line)
        else:
            current = None
    return {opt: flat(" ".join(lines)) for opt, lines in blocks.items()}


@pytest.fixture
def wide(monkeypatch):
    """argparse wraps to $COLUMNS: wide enough that a block's words stay on one line for the regexes."""
    monkeypatch.setenv("COLUMNS", "400")


def test_bare_dupfast_prints_the_full_help_and_exits_0():
    script = pathlib.Path(sys.executable).with_name("dupfast")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from dupfast.cli import main; "
                                                                         "sys.exit(main([]))"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr
    names = set(subcommands())
    assert DOCUMENTED <= names
    for name in names:  # every command with its one-line description and an example command line
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"  {name} "))
        assert len(line.split()) > 2, line
        assert re.search(rf"^\s+e\.g\. dupfast {re.escape(name)} \S", proc.stdout, re.MULTILINE), name
    assert flat(DESCRIPTION) in flat(proc.stdout) and flat(DESCRIPTION).endswith("BTU).")  # not cut mid-sentence


def test_main_without_a_command_returns_0_with_the_help_on_stdout(capsys):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: dupfast") and "commands:" in out and err == ""


def test_help_flag_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f"e.g. dupfast {name} " in out for name in subcommands())


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dupfast {importlib.metadata.version('dupfast')}"


def test_version_falls_back_to_the_package_version(monkeypatch):
    import dupfast

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(dupfast, "__version__", "9.8.7")
    assert version() == "9.8.7"


def test_every_subcommand_help_shows_its_defaults(wide):
    for name, parser in subcommands().items():
        blocks = option_blocks(parser.format_help())
        for action in parser._actions:
            d = action.default
            if (not action.option_strings or d is None or d is False or d is argparse.SUPPRESS
                    or (isinstance(d, (list, tuple)) and not d)):
                continue
            block = blocks[action.option_strings[-1]]
            assert "default" in block, f"dupfast {name} {action.option_strings[-1]}: {block}"
            if "default" not in (action.help or ""):  # shown by the formatter: the value itself
                assert f"(default: {d})" in block, f"dupfast {name} {action.option_strings[-1]}: {block}"
        assert "example:" in parser.format_help(), name


def shown_default(parser, option):
    block = option_blocks(parser.format_help())[option]
    return re.search(r"\(default: ([^)]+)\)", block).group(1)


def test_defaults_shown_in_words_are_the_library_defaults(wide):
    """Options whose absence means "the library's value" (None, so an explicit value can be told apart) show that
    value in --help without importing torch; it must be the real one."""
    from dupfast.detection import Detector
    from dupfast.purification import PurifyConfig

    commands = subcommands()
    purify = commands["purify"]
    for option, field in (("--lambda-asr", "lambda_asr"), ("--lambda-acc", "lambda_acc"), ("--epochs", "epochs"),
                          ("--lr", "lr"), ("--batch-size", "batch_size"), ("--seed", "seed")):
        assert float(shown_default(purify, option)) == getattr(PurifyConfig, field), option
    params = inspect.signature(Detector).parameters
    assert float(shown_default(commands["detect"], "--frr")) == params["frr"].default
    assert float(shown_default(commands["detect"], "--pool-trim")) == params["pool_trim"].default


def test_the_timing_pattern_catches_the_old_help_texts():
    for old in ("measured 2.0x fp32 on MiniLM", "minilm (the default) 195 s (AVX2 EPYC", "(CPU, about 2 minutes)"):
        assert TIMING.search(old), old
    for fine in ("(default: 0.05)", "--set epochs=8 min_steps=0", "smollm2-135m", "k = fraction x vocabulary size"):
        assert not TIMING.search(fine), fine


def test_no_help_text_holds_a_timing(wide):
    parser = build_parser()
    texts = {"dupfast": parser.format_help(), **{n: p.format_help() for n, p in subcommands(parser).items()}}
    for name, text in texts.items():
        found = TIMING.search(text)
        assert found is None, f"{name} --help: {text[max(0, found.start() - 60):found.end() + 20]!r}"


def test_every_command_has_the_progress_quiet_pair(wide):
    for name, parser in subcommands().items():
        blocks = option_blocks(parser.format_help())
        assert "--progress" in blocks and "--quiet" in blocks, name
        with pytest.raises(SystemExit):  # one or the other
            parser.parse_args(["--progress", "--quiet"])


# ---- --progress / --quiet on a cheap command: detect with a tiny classifier --------------------------------

@pytest.fixture(scope="module")
def detect_files(tmp_path_factory):
    from tiny_models import sentiment_samples, tiny_classifier

    root = tmp_path_factory.mktemp("cli-help")
    model, tok = tiny_classifier("bert")
    model.config.architectures = ["BertForSequenceClassification"]  # a fine-tuned head, as detect requires
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    for name, rows in (("clean", [(s.text, s.label) for s in sentiment_samples(60, seed=1)]),
                       # poison_label all 0: the report leaves the ROC out with a note (an informational line)
                       ("pool", [(s.text, 0) for s in sentiment_samples(30, seed=2)])):
        with open(root / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label" if name == "clean" else "poison_label"])
            w.writerows(rows)
    return root


def run_detect(files, out, *flags):
    import torch

    before = torch.get_num_threads()
    try:
        return main(["detect", str(files / "model"), "--texts", str(files / "pool.csv"), "--clean",
                     str(files / "clean.csv"), "--out", str(out), "--threads", "1", *flags])
    finally:
        torch.set_num_threads(before)


def test_quiet_prints_only_the_verdict_and_the_result(detect_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUPFAST_QUIET", raising=False)
    assert run_detect(detect_files, tmp_path / "q", "--quiet") == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("dupfast detect: ") and "evidence of poison" in err, err
    assert "%|" not in err and "note:" not in err
    assert '"samples": 30' in out
    assert "DUPFAST_QUIET" not in os.environ  # the switch is undone after the run


def test_progress_shows_the_forward_pass_bars(detect_files, tmp_path, capsys):
    assert run_detect(detect_files, tmp_path / "p", "--progress") == 0
    err = capsys.readouterr().err
    assert "clean:" in err and "pool:" in err and "%|" in err
    assert "note: every poison_label is 0" in err and "evidence of poison" in err


def test_without_a_terminal_the_default_shows_no_bars(detect_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUPFAST_QUIET", raising=False)
    assert run_detect(detect_files, tmp_path / "d") == 0  # capsys: stderr is not a terminal
    err = capsys.readouterr().err
    assert "%|" not in err and "note: every poison_label is 0" in err

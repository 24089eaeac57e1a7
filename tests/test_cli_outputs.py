"""Every command that writes to --out checks, before any model loading or compute, that it can write there: a path
under a regular file, a folder that refuses writes (read-only: simulated, since root ignores file modes) and a
kernel folder that takes no files fail fast with exit status 2 and one line naming the path. An OSError raised
later (a full disk) is one line too; an internal KeyError is not passed off as a user error."""
import errno
import importlib
import json
import os
import pathlib

import pytest

from dupfast.cli import main
from dupfast.cli.demo import write_report
from dupfast.cli.outdir import prepare_out
from tiny_models import sentiment_samples, tiny_classifier

# the first heavy step of each command (model loading, or the demo's pipeline): patched to raise if reached
HEAVY = {"detect": ("dupfast.cli.detect", "load_classifier"),
         "detect-prompts": ("dupfast.cli.generative", "load_causal_lm"),
         "purify": ("dupfast.cli.purify", "load_classifier"),
         "purify-generative": ("dupfast.cli.generative", "load_causal_lm"),
         "btu": ("dupfast.harness.models", "load_model"),
         "demo": ("dupfast.cli.demo", "run_pipeline")}
COMMANDS = list(HEAVY)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Valid inputs for every command (a tiny classifier folder, texts, labels, flags, chat rows): with a
    writable --out each command gets as far as its heavy step."""
    root = tmp_path_factory.mktemp("cli_outputs")
    model, tok = tiny_classifier("bert")
    model.save_pretrained(str(root / "classifier"))
    tok.save_pretrained(str(root / "classifier"))
    pool, clean = sentiment_samples(12, seed=1), sentiment_samples(16, seed=2)
    (root / "pool.txt").write_text("\n".join(s.text for s in pool) + "\n")
    (root / "clean.tsv").write_text("sentence\tlabel\n" + "".join(f"{s.text}\t{s.label}\n" for s in clean))
    (root / "flags.json").write_text(json.dumps([i % 2 for i in range(12)]))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": s.text}) + "\n" for s in pool))
    (root / "chat.jsonl").write_text("".join(json.dumps({"prompt": s.text, "response": "ok", "label": s.label})
                                             + "\n" for s in clean))
    return root


def argv(command, root, out):
    r = lambda name: str(root / name)  # noqa: E731
    chat = ["--prompts", r("prompts.jsonl"), "--clean", r("chat.jsonl"), "--out", str(out)]
    return {"detect": ["detect", r("classifier"), "--texts", r("pool.txt"), "--clean", r("clean.tsv"), "--out",
                       str(out), "--threads", "1"],
            "detect-prompts": ["detect-prompts", r("classifier"), *chat],
            "purify": ["purify", r("classifier"), "--suspect", r("pool.txt"), "--clean", r("clean.tsv"), "--flags",
                       r("flags.json"), "--threads", "1", "--out", str(out)],
            "purify-generative": ["purify-generative", r("classifier"), *chat],
            "btu": ["btu", r("classifier"), r("clean.tsv"), "--expose-only", "--threads", "1", "--out", str(out)],
            # the demo's --out is the JSON report's path
            "demo": ["demo", "--model", r("classifier"), "--cache-dir", r("cache"), "--out",
                     str(pathlib.Path(out) / "report.json")]}[command]


class Reached(Exception):
    """The heavy step ran."""


def patch_heavy(monkeypatch, command, exc):
    module, name = HEAVY[command]

    def heavy(*args, **kwargs):
        raise exc

    monkeypatch.setattr(importlib.import_module(module), name, heavy)


def one_error_line(err, command):
    assert err.startswith(f"dupfast {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be created in, as on a read-only mount: mode 0o555, and (root ignores modes) os.open
    for writing and os.mkdir inside it fail with EACCES (tempfile and pathlib.Path.mkdir go through them)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path):
        return isinstance(path, (str, os.PathLike)) and pathlib.Path(path).resolve().is_relative_to(ro.resolve())

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    yield ro
    ro.chmod(0o755)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_writable_out_reaches_the_heavy_step(files, tmp_path, monkeypatch, command):
    """The patched step is the one each command reaches with good inputs (so the tests below, where it must not
    be reached, can fail)."""
    patch_heavy(monkeypatch, command, Reached())
    with pytest.raises(Reached):
        main(argv(command, files, tmp_path / "out"))


@pytest.mark.parametrize("command", COMMANDS)
def test_out_under_a_regular_file_fails_before_any_work(files, tmp_path, monkeypatch, capsys, command):
    patch_heavy(monkeypatch, command, AssertionError(f"{command}: the heavy step ran"))
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    args = argv(command, files, blocker / "sub")
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err, command)
    assert f"--out {args[args.index('--out') + 1]}: {blocker} is a file, not a folder: choose another path" in err
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_in_a_read_only_folder_fails_before_any_work(files, read_only, monkeypatch, capsys, command):
    patch_heavy(monkeypatch, command, AssertionError(f"{command}: the heavy step ran"))
    assert main(argv(command, files, read_only / "out")) == 2
    err = one_error_line(capsys.readouterr().err, command)
    assert f"cannot write in {read_only} (Permission denied): choose a folder you can write to" in err
    assert list(read_only.iterdir()) == []  # neither the folder nor a probe file


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("command", COMMANDS)
def test_out_in_a_folder_the_kernel_refuses_fails_before_any_work(files, monkeypatch, capsys, command):
    """/proc takes no new files, root or not: the probe itself is refused, nothing simulated."""
    patch_heavy(monkeypatch, command, AssertionError(f"{command}: the heavy step ran"))
    assert main(argv(command, files, "/proc/dupfast-no-such-out")) == 2
    assert "cannot write in /proc (" in one_error_line(capsys.readouterr().err, command)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("exc, fix", [
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/x/model"), "check its permissions"),
    (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "/data/x/report.json"), "a folder is where a file"),
    (NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/data/f/model"), "a file is where a folder"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x/model.safetensors"), "free some disk space"),
], ids=["permission", "is-a-directory", "not-a-directory", "disk-full"])
def test_an_os_error_during_the_work_is_one_line_naming_the_path(files, tmp_path, monkeypatch, capsys, command,
                                                                  exc, fix):
    patch_heavy(monkeypatch, command, exc)
    assert main(argv(command, files, tmp_path / "out")) == 2
    err = one_error_line(capsys.readouterr().err, command)
    assert f"error: {exc.strerror}: {exc.filename} ({fix}" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_an_internal_key_error_is_not_passed_off_as_a_user_error(files, tmp_path, monkeypatch, command):
    """No command raises KeyError on purpose (input errors are ValueErrors): one is a bug, and keeps its traceback
    instead of becoming exit status 2 with the bare key as the message."""
    patch_heavy(monkeypatch, command, KeyError("hidden_states"))
    with pytest.raises(KeyError, match="hidden_states"):
        main(argv(command, files, tmp_path / "out"))


def test_prepare_out_leaves_no_probe_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert prepare_out(out, False, ("scores.csv",)) == out
    assert prepare_out(out, False, ("scores.csv",)) == out  # still empty: a left probe would read as a run's entry
    assert prepare_out(tmp_path / "new" / "deeper", False, ("scores.csv",)) == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []


def test_demo_out_folder_holds_report_json(files, tmp_path, monkeypatch, capsys):
    """An existing folder as the demo's --out gets report.json (and report.md) inside it, no stray temp file; the
    pipeline is the real one with no steps."""
    monkeypatch.setattr(importlib.import_module("dupfast.cli.demo"), "DEMO_STEPS", [])
    out = tmp_path / "runs"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    assert main(["demo", "--model", str(files / "classifier"), "--cache-dir", str(tmp_path / "cache"), "--out",
                 str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == {}
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "report.json", "report.md"]
    assert f"JSON: {out / 'report.json'}" in capsys.readouterr().out


@pytest.mark.parametrize("name, given", [("report.json", "."), ("report.md", "."), ("report.md", "report.json")])
def test_demo_out_whose_report_would_be_a_folder_fails_before_the_pipeline(files, tmp_path, monkeypatch, capsys,
                                                                           name, given):
    """--out a folder (report.json in it) or the report's path, where the JSON or markdown report is a folder."""
    patch_heavy(monkeypatch, "demo", AssertionError("demo: the pipeline ran"))
    (tmp_path / name).mkdir()
    out = tmp_path / given
    assert main(["demo", "--model", str(files / "classifier"), "--out", str(out)]) == 2
    err = one_error_line(capsys.readouterr().err, "demo")
    assert f"--out {out}: {tmp_path / name} is a folder, so the report cannot be written there" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_demo_out_ending_in_md_fails_before_the_pipeline(files, tmp_path, monkeypatch, capsys):
    patch_heavy(monkeypatch, "demo", AssertionError("demo: the pipeline ran"))
    assert main(["demo", "--model", str(files / "classifier"), "--out", str(tmp_path / "report.md")]) == 2
    assert "cannot end in .md" in one_error_line(capsys.readouterr().err, "demo")


def test_write_report_onto_a_folder_leaves_no_temp_file(tmp_path):
    (tmp_path / "report.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_report({"a": 1}, tmp_path / "report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_report_on_a_full_disk_keeps_the_earlier_report_and_no_temp_file(tmp_path, monkeypatch):
    out = write_report({"run": 1}, tmp_path / "report.json")
    real_write_text = pathlib.Path.write_text

    def half_then_full(self, data, *args, **kwargs):  # the temp file is created, then the disk fills
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_report({"run": 2}, out)
    assert json.loads(out.read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

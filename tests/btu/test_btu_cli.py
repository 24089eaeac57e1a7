"""`dupfast btu` on a tiny saved model: report, defended model, clear errors."""
import json

import pytest

from dupfast.cli import main

from btu_toys import bert_tokenizer, poisoned_task, tiny_bert


def write_tsv(path, samples):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y, *_ in samples))
    return str(path)


def write_csv(path, samples):
    path.write_text(",0,1,2\n" + "".join(f"{i},{t},{y},{p}\n" for i, (t, y, p) in enumerate(samples)))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("btu_cli")
    tok = bert_tokenizer()
    tiny_bert(tok).save_pretrained(str(d / "tiny"), safe_serialization=True)
    tok.save_pretrained(str(d / "tiny"))
    train, test, poison = poisoned_task(n=160)
    return {"dir": d, "model": str(d / "tiny"), "train": write_csv(d / "train.csv", train),
            "test": write_tsv(d / "test.tsv", test), "poison": write_csv(d / "poison.csv", poison),
            "tune": write_tsv(d / "tune.tsv", [s for s in train if not s[2]][:40])}


FAST = ["--epochs", "1", "--lr", "1e-3", "--batch-size", "16", "--max-len", "32",
        "--threads", "1"]


def test_cli_writes_report_and_model(files, capsys):
    out = files["dir"] / "out"
    rc = main(["btu", files["model"], files["train"], "--out", str(out), "--clean-tune", files["tune"],
               "--eval", files["test"], "--eval-poison", files["poison"], "--target", "1", "--fraction", "0.05", *FAST])
    assert rc == 0
    report = json.loads((out / "btu_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["expose", "finetune", "unlearn", "clean_tune"]
    for step in report["steps"][1:]:
        assert set(step["eval"]) == {"cacc", "asr"} and 0 <= step["eval"]["asr"] <= 1
    assert len(report["suspects"]) >= 1 and report["train"] == files["train"]
    assert (out / "model" / "model.safetensors").is_file()
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert "suspicious tokens" in capsys.readouterr().out


def test_cli_expose_only(files):
    out = files["dir"] / "exp"
    assert main(["btu", files["model"], files["train"], "--out", str(out), "--expose-only", "--fraction", "0.05",
                 *FAST]) == 0
    report = json.loads((out / "btu_report.json").read_text())
    assert [r["name"] for r in report["exposure"]["rounds"]] == ["R1", "R2", "R3"]
    assert not (out / "model").exists()


def test_cli_expose_against_clean_tune(files):
    """The rounds are ranked against the same rounds on the --clean-tune file: the report carries each round's
    scale a (> 0: the toy's clean file shares its words with the training file)."""
    out = files["dir"] / "exp_ref"
    assert main(["btu", files["model"], files["train"], "--out", str(out), "--expose-only", "--fraction", "0.05",
                 "--clean-tune", files["tune"], "--expose-against-clean-tune", *FAST]) == 0
    rounds = json.loads((out / "btu_report.json").read_text())["exposure"]["rounds"]
    assert [r["name"] for r in rounds] == ["R1", "R2", "R3"]
    assert all(r["reference_scale"] > 0 and r["reference_seconds"] > 0 for r in rounds)


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such file"),
    (["{train}", "--eval-poison", "{poison}"], "needs --target"),
    (["{train}", "--fraction", "1.5"], "k fraction"),
    (["{train}", "--fraction", "0"], "k fraction"),
    (["{train}", "--max-document-share", "0"], "max_document_share"),
    (["{train}", "--max-document-share", "2"], "max_document_share"),
    (["{train}", "--expose-against-clean-tune"], "needs --clean-tune"),
    (["{bad}"], "unknown format"),
])
def test_cli_errors(files, capsys, args, message):
    (files["dir"] / "train.json").write_text("{}")
    subs = {"missing": str(files["dir"] / "nope.tsv"), "train": files["train"], "poison": files["poison"],
            "bad": str(files["dir"] / "train.json")}
    argv = ["btu", files["model"], *[a.format(**subs) for a in args], "--out", str(files["dir"] / "err"), *FAST]
    assert main(argv) == 2
    assert message in capsys.readouterr().err

"""`dupfast purify` on a tiny from-scratch model folder: saves a loadable merged model and a JSON report;
bad files give exit status 2 and a message naming the problem."""
import json

import pytest

from dupfast.cli import main
from tiny_models import sentiment_samples, tiny_bert_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("purify_cli")
    model_dir = tiny_bert_dir(root / "model")
    pool, clean = sentiment_samples(20, seed=1), sentiment_samples(24, seed=2)
    (root / "pool.txt").write_text("\n".join(s.text for s in pool) + "\n")
    (root / "clean.tsv").write_text("sentence\tlabel\n" + "".join(f"{s.text}\t{s.label}\n" for s in clean))
    # the same sets with the columns in other orders: found by name, as `dupfast detect` finds them
    (root / "pool.csv").write_text("id,review\n" + "".join(f"{i},{s.text}\n" for i, s in enumerate(pool)))
    (root / "clean_label_first.tsv").write_text("label\ttext\n" + "".join(f"{s.label}\t{s.text}\n" for s in clean))
    (root / "flags.json").write_text(json.dumps([i % 2 for i in range(20)]))
    (root / "short_flags.txt").write_text("1\n0\n")
    return root, model_dir


def test_cli_purifies_and_saves(files, capsys):
    from transformers import AutoModelForSequenceClassification

    root, model_dir = files
    out = root / "out"
    rc = main(["purify", str(model_dir), "--suspect", str(root / "pool.txt"), "--clean", str(root / "clean.tsv"),
               "--out", str(out), "--flags", str(root / "flags.json"), "--epochs", "1", "--batch-size", "8",
               "--threads", "1", "--set", "progress=false", "holdout_fraction=0.25"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["flagged"] == 10
    report = json.loads((out / "purify_report.json").read_text())
    assert report["data"]["pool"] == 20 and report["data"]["clean"] == 24
    assert report["config"]["epochs"] == 1 and report["config"]["holdout_fraction"] == 0.25
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert not any("lora" in k for k in model.state_dict())
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()


def test_cli_reads_columns_by_name(files, capsys):
    root, model_dir = files
    rc = main(["purify", str(model_dir), "--suspect", str(root / "pool.csv"), "--clean",
               str(root / "clean_label_first.tsv"), "--out", str(root / "by_name"), "--flags", str(root / "flags.json"),
               "--threads", "1", "--set", "progress=false", "max_steps=1"])
    assert rc == 0
    report = json.loads((root / "by_name" / "purify_report.json").read_text())
    assert report["data"]["pool"] == 20 and report["data"]["clean"] == 24 and report["data"]["num_labels"] == 2


@pytest.mark.parametrize("args, message", [
    (["--flags", "short_flags.txt"], "holds 2 flags but the suspect set has 20 rows"),
    (["--set", "lambda_asr=-1"], "lambda_asr must be a finite number >= 0"),
    (["--set", "colour=red"], "unknown PurifyConfig field 'colour'"),
    (["--clean", "pool.txt"], "the clean set needs labels"),
    (["--suspect", "missing.tsv"], "no such file"),
])
def test_cli_bad_input(files, capsys, args, message):
    root, model_dir = files
    base = {"--suspect": "pool.txt", "--clean": "clean.tsv", "--flags": "flags.json"}
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
    argv = ["purify", str(model_dir), "--out", str(root / "bad")]
    for flag, value in base.items():
        argv += [flag, str(root / value)]
    if args[0] == "--set":
        argv += args
    assert main(argv) == 2
    assert message in capsys.readouterr().err

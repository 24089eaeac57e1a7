"""`dupfast purify` on a tiny from-scratch classifier folder: saves a loadable merged model and a JSON report;
bad files, a model without its head, zero counts and an --out holding an earlier run give exit status 2 and a
message naming the problem, before any work and without touching what is there."""
import json

import pytest
import torch

from dupfast.cli import main
from tiny_models import sentiment_samples, tiny_bert_dir, tiny_classifier


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("purify_cli")
    model, tok = tiny_classifier("bert")  # a sequence classifier with its head, as a fine-tuned victim is saved
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    tiny_bert_dir(root / "encoder")  # a bare BertModel: no head
    pool, clean = sentiment_samples(20, seed=1), sentiment_samples(24, seed=2)
    (root / "pool.txt").write_text("\n".join(s.text for s in pool) + "\n")
    (root / "clean.tsv").write_text("sentence\tlabel\n" + "".join(f"{s.text}\t{s.label}\n" for s in clean))
    # the same sets with the columns in other orders: found by name, as `dupfast detect` finds them
    (root / "pool.csv").write_text("id,review\n" + "".join(f"{i},{s.text}\n" for i, s in enumerate(pool)))
    (root / "clean_label_first.tsv").write_text("label\ttext\n" + "".join(f"{s.label}\t{s.text}\n" for s in clean))
    (root / "clean_null.jsonl").write_text("".join(json.dumps({"text": None if i == 2 else s.text, "label": s.label})
                                                   + "\n" for i, s in enumerate(clean)))
    (root / "flags.json").write_text(json.dumps([i % 2 for i in range(20)]))
    (root / "short_flags.txt").write_text("1\n0\n")
    (root / "a_file").write_text("not a folder")
    return root, root / "model"


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
    (["--clean", "clean_null.jsonl"], "clean_null.jsonl line 3: the text in column 'text' must be a string, got None"),
    (["--model", "encoder"], "has no fine-tuned classification head (architectures: ['BertModel'])"),
    (["--model", "minilm"], "model minilm ("),  # a short name's pretrained encoder: no fine-tuned head
    (["--num-labels", "3"], "--num-labels 3, but the classifier in"),
    (["--out", "a_file"], "is a file, not a folder"),
])
def test_cli_bad_input(files, capsys, args, message):
    root, model_dir = files
    base = {"--model": str(model_dir), "--suspect": "pool.txt", "--clean": "clean.tsv", "--flags": "flags.json",
            "--out": "bad"}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    name = base.pop("--model")
    argv = ["purify", name if name == "minilm" else str(root / name)] + extra
    for flag, value in base.items():
        argv += [flag, str(root / value)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err
    assert not (root / "bad").exists()  # nothing written


@pytest.mark.parametrize("flag", ["--batch-size", "--threads", "--epochs", "--max-len"])
def test_cli_rejects_zero_counts(files, capsys, flag):
    root, model_dir = files
    with pytest.raises(SystemExit) as exc:
        main(["purify", str(model_dir), "--suspect", str(root / "pool.txt"), "--clean", str(root / "clean.tsv"),
              "--out", str(root / "zero"), flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_cli_out_with_an_earlier_run_needs_overwrite(files, capsys):
    root, model_dir = files
    out = root / "again"
    argv = ["purify", str(model_dir), "--suspect", str(root / "pool.txt"), "--clean", str(root / "clean.tsv"),
            "--flags", str(root / "flags.json"), "--threads", "1", "--set", "progress=false", "max_steps=1",
            "--out", str(out)]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    first = (out / "purify_report.json").read_text()
    capsys.readouterr()
    assert main(argv + ["--seed", "7"]) == 2  # refused before any work: the earlier results are kept
    err = capsys.readouterr().err
    assert "already holds 5 entries" in err and "--overwrite" in err  # model, 2 reports, trajectory, notes
    assert (out / "purify_report.json").read_text() == first
    assert main(argv + ["--seed", "7", "--overwrite"]) == 0
    report = json.loads((out / "purify_report.json").read_text())
    assert report["config"]["seed"] == 7 and (out / "notes.txt").read_text() == "mine"  # the user's file stays


def test_cli_token_rows_match_the_api_over_length_sorted_batches(files):
    """The CLI tokenises once into rows (no padding round trip); the result equals the API on the batches it
    used to build."""
    from safetensors.torch import load_file

    import dupfast
    from dupfast.batching import TextBatcher
    from dupfast.cli.purify import load_classifier, read_flags

    root, model_dir = files
    out = root / "rows"
    set_ = ["progress=false", "max_steps=3", "select_best=false", "early_stop=false", "lr=1e-2"]
    assert main(["purify", str(model_dir), "--suspect", str(root / "pool.txt"), "--clean", str(root / "clean.tsv"),
                 "--flags", str(root / "flags.json"), "--threads", "1", "--batch-size", "8", "--out", str(out),
                 "--set", *set_]) == 0
    model, tok = load_classifier(model_dir)
    pool = [s.text for s in sentiment_samples(20, seed=1)]
    clean = sentiment_samples(24, seed=2)
    flags = torch.as_tensor(read_flags(root / "flags.json", 20), dtype=torch.bool)
    clean_batches = TextBatcher(tok, [s.text for s in clean], [s.label for s in clean], 128).batches(8)
    api, _ = dupfast.purify(model, list(TextBatcher(tok, pool, None, 128).batches(8)), clean=list(clean_batches),
                            detection=flags, batch_size=8, progress=False, max_steps=3, select_best=False,
                            early_stop=False, lr=1e-2)
    saved = load_file(str(out / "model" / "model.safetensors"))
    for k, v in api.state_dict().items():
        if k in saved:
            assert torch.equal(saved[k], v), k

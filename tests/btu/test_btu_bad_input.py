"""BTU on bad input: a clear error naming the problem, API and command line, before any training; an --out
holding an earlier run is refused unless --overwrite, a file as --out fails before any work."""
import json

import pytest
import torch

from dupfast.btu import BTUConfig, ExposureConfig, expose, train
from dupfast.cli import main
from dupfast.finetune import FinetuneConfig

from btu_toys import bert_tokenizer, poisoned_task, tiny_bert

ROUND = FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, max_len=32, warmup_ratio=0.0, weight_decay=0.01, seed=1)
CONFIG = BTUConfig(exposure=ExposureConfig(fraction=0.05, shallow=ROUND, full=ROUND), finetune=ROUND, clean_tune=ROUND)


# ---- API ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts", [["", ""], ["[CLS]", "[SEP] [PAD]"]])
def test_texts_without_a_rankable_token_are_an_error(bert, texts):
    """Weight decay moves every embedding row, so empty texts used to 'expose' tokens absent from the data."""
    model, tok = bert
    data = [(texts[i % 2], i % 2) for i in range(20)]
    with pytest.raises(ValueError, match="the training set holds no token BTU can rank: its texts are empty"):
        expose(model, data, tokenizer=tok, config=CONFIG.exposure)
    with pytest.raises(ValueError, match="holds no token BTU can rank"):
        train(model, data, tokenizer=tok, config=CONFIG)


def test_only_tokens_of_the_data_are_ranked(bert):
    model, tok = bert
    data = [("good movie" if i % 2 else "bad movie", i % 2) for i in range(40)]
    ex = expose(model, data, tokenizer=tok, config=ExposureConfig(fraction=0.5, shallow=ROUND, full=ROUND))
    present = set(tok.convert_tokens_to_ids(["good", "bad", "movie"]))
    assert ex.token_ids and set(ex.token_ids) <= present
    assert int(ex.eligible.sum()) == 3
    assert ex.rank(tok.convert_tokens_to_ids("great"), "R1") is None  # absent: not ranked at all


def test_none_text_is_named(bert):
    model, tok = bert
    with pytest.raises(TypeError, match=r"training set\[0\]: text must be a str, got NoneType"):
        train(model, [(None, 0), ("good", 1)], tokenizer=tok, config=CONFIG)
    with pytest.raises(TypeError, match=r"clean-tune set\[1\]: text must be a str, got NoneType"):
        train(model, [("bad", 0), ("good", 1)], clean_tune=[("bad", 0), (None, 1)], tokenizer=tok, config=CONFIG)


@pytest.mark.parametrize("field", ["batch_size", "epochs", "max_len"])
def test_zero_counts_in_the_recipe(field):
    with pytest.raises(ValueError, match=f"FinetuneConfig.{field} must be >= 1, got 0"):
        BTUConfig(finetune=FinetuneConfig(**{field: 0}))


def test_loader_labels_of_another_length(bert):
    model, tok = bert
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"training set batch 0: 1 'labels' values for 2 rows"):
        train(model, [batch], tokenizer=tok, config=CONFIG)


def test_the_configs_carry_no_model_field():
    """The recipes are model-free (the model is train's first argument); only a victim names its checkpoint."""
    import dataclasses
    from dupfast.harness.victims import VictimConfig
    for cfg in (CONFIG.finetune, CONFIG.clean_tune, CONFIG.exposure.shallow, CONFIG.exposure.full):
        assert "model" not in {f.name for f in dataclasses.fields(cfg)}
    assert VictimConfig().model == "minilm"


# ---- command line --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("btu_bad")
    tok = bert_tokenizer()
    tiny_bert(tok).save_pretrained(str(d / "tiny"), safe_serialization=True)
    tok.save_pretrained(str(d / "tiny"))
    train_set, _, _ = poisoned_task(n=60)
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y, _ in train_set))
    (d / "empty.tsv").write_text("sentence\tlabel\n" + "".join(f"\t{i % 2}\n" for i in range(20)))
    (d / "null.jsonl").write_text("".join(json.dumps({"text": None if i == 4 else t, "label": y}) + "\n"
                                          for i, (t, y, _) in enumerate(train_set)))
    (d / "a_file").write_text("not a folder")
    return d


FAST = ["--fraction", "0.05", "--epochs", "1", "--batch-size", "16", "--max-len", "32", "--threads", "1"]


@pytest.mark.parametrize("train_file, extra, message", [
    ("empty.tsv", [], "holds no token BTU can rank"),
    ("null.jsonl", [], "null.jsonl line 5: the text in column 'text' must be a string, got None"),
    ("train.tsv", ["--out", "a_file"], "is a file, not a folder"),
])
def test_cli_errors(files, capsys, train_file, extra, message):
    out = ["--out", str(files / extra[1])] if extra else ["--out", str(files / "err")]
    assert main(["btu", str(files / "tiny"), str(files / train_file), "--expose-only", *FAST, *out]) == 2
    assert message in capsys.readouterr().err
    assert not (files / "err").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--threads", "--epochs", "--max-len"])
def test_cli_rejects_zero_counts(files, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        main(["btu", str(files / "tiny"), str(files / "train.tsv"), "--out", str(files / "zero"), flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_cli_out_with_an_earlier_run_needs_overwrite(files, capsys):
    out = files / "again"
    argv = ["btu", str(files / "tiny"), str(files / "train.tsv"), "--expose-only", *FAST, "--out", str(out)]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    first = (out / "btu_report.json").read_text()
    capsys.readouterr()
    assert main(argv + ["--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "already holds 4 entries" in err and "--overwrite" in err  # report, report.md, suspects PNG, notes
    assert (out / "btu_report.json").read_text() == first
    assert main(argv + ["--seed", "7", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"

"""`dupfast detect` on the command line, the text-level API and the report files."""
import csv
import json

import pytest

from detect_helpers import tiny_texts, tiny_tokenizer, write_table
from dupfast.harness import metrics
from dupfast.cli import main
from dupfast.detection import detect_texts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    clean = tiny_texts(100, seed=1)
    pool = tiny_texts(25, seed=2) + tiny_texts(25, seed=3, trigger=True)
    clean_tsv = write_table(d / "clean.tsv", ["sentence", "label"], [(t, i % 2) for i, t in enumerate(clean)], "\t")
    # the pool in DUP's CSV dump format: index, text, label, poison_label
    pool_csv = write_table(d / "pool.csv", ["", "0", "1", "2"], [(i, t, 1, int(i >= 25)) for i, t in enumerate(pool)], ",")
    return clean_tsv, pool_csv, pool


def test_cli_with_clean_set_writes_scores_report_plots_and_detector(tmp_path, model_dir, files):
    clean_tsv, pool_csv, pool = files
    out = tmp_path / "out"
    rc = main(["detect", str(model_dir), "--texts", str(pool_csv), "--clean", str(clean_tsv), "--out", str(out),
               "--mode", "dup", "--threads", "1"])
    assert rc == 0
    summary = json.loads((out / "detect.json").read_text())
    assert summary["samples"] == 50 and summary["mode"] == "dup"
    rows = list(csv.DictReader(open(out / "scores.csv")))
    # ground truth was read from the pool's poison_label column and scored against the written scores
    truth = [int(i >= 25) for i in range(50)]
    assert summary["auroc"] == pytest.approx(metrics.auroc(truth, [float(r["score"]) for r in rows]), abs=1e-4)
    assert summary["auroc"] > 0.6
    assert [r["text"] for r in rows] == pool  # input order
    assert sum(int(r["flag"]) for r in rows) == summary["flagged"]
    for png in ("detect_hist.png", "detect_roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved detector scores the same texts identically
    out2 = tmp_path / "out2"
    assert main(["detect", str(model_dir), "--texts", str(pool_csv), "--detector", str(out / "detector"),
                 "--out", str(out2)]) == 0
    rows2 = list(csv.DictReader(open(out2 / "scores.csv")))
    assert [r["score"] for r in rows2] == [r["score"] for r in rows]


def test_cli_pool_only(tmp_path, model_dir, files):
    _, pool_csv, _ = files
    assert main(["detect", str(model_dir), "--texts", str(pool_csv), "--out", str(tmp_path), "--threads", "1",
                 "--frr", "0.1", "--pool-trim", "0.3", "--pool-only"]) == 0
    report = json.loads((tmp_path / "detect.json").read_text())
    assert report["calibration"]["source"] == "pool" and "UNCALIBRATED" in report["verdict"]["sentence"]


def test_cli_without_a_clean_set_says_what_one_is(tmp_path, model_dir, files, capsys):
    _, pool_csv, _ = files
    assert main(["detect", str(model_dir), "--texts", str(pool_csv), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs a clean set" in err and "--clean FILE" in err and "--pool-only" in err
    assert not (tmp_path / "o").exists()


def test_cli_autocast_auto_is_recorded_in_the_detector(tmp_path, model_dir, files, capsys):
    clean_tsv, pool_csv, _ = files
    assert main(["detect", str(model_dir), "--texts", str(pool_csv), "--clean", str(clean_tsv), "--out",
                 str(tmp_path / "out"), "--threads", "1", "--autocast", "auto"]) == 0
    assert json.loads((tmp_path / "out" / "detector" / "detector.json").read_text())["autocast"] == "auto"
    assert main(["detect", str(model_dir), "--texts", str(pool_csv), "--out", str(tmp_path / "o2"), "--bf16",
                 "--autocast", "auto", "--pool-only"]) == 2
    assert "--bf16 contradicts --autocast auto" in capsys.readouterr().err


def test_cli_bad_files(tmp_path, model_dir, files, capsys):
    clean_tsv, pool_csv, _ = files
    out = tmp_path / "out"  # not tmp_path itself: it holds the input files, and --out must be new or empty
    assert main(["detect", str(model_dir), "--texts", str(tmp_path / "nope.tsv"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    nolabel = write_table(tmp_path / "nolabel.tsv", ["sentence"], [("w1 w2",)] * 30, "\t")
    assert main(["detect", str(model_dir), "--texts", str(pool_csv), "--clean", str(nolabel), "--out", str(out)]) == 2
    assert "needs a label column" in capsys.readouterr().err
    empty = write_table(tmp_path / "empty.tsv", ["sentence", "label"], [], "\t")
    assert main(["detect", str(model_dir), "--texts", str(empty), "--out", str(out)]) == 2
    assert "no data rows" in capsys.readouterr().err


def test_detect_texts_returns_input_order(model_dir, files):
    from transformers import AutoModelForSequenceClassification
    _, _, pool = files
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    clean = tiny_texts(100, seed=1)
    res = detect_texts(model, tiny_tokenizer(), pool, clean_texts=clean, clean_labels=[i % 2 for i in range(100)],
                       mode="dup", batch_size=16)
    assert res.index.tolist() == list(range(50))
    assert res.scores[25:].mean() > res.scores[:25].mean()
    with pytest.raises(ValueError, match="need clean_labels"):
        detect_texts(model, tiny_tokenizer(), pool, clean_texts=clean)
    with pytest.raises(TypeError, match="sequence of strings"):
        detect_texts(model, tiny_tokenizer(), "one text")

"""`dupfast screen` on tiny from-scratch models: fine-tune (or take) a classifier, detect on the data set itself,
write kept.csv / flagged.csv (every original column + row_id, score, flag), report.md and screen.json; the
guards (a fine-tune at chance, string labels) stop before any work; `dupfast purify` reads the outputs of
`detect` and `screen` (--flags scores.csv / flagged.csv / kept.csv, --detector)."""
import csv
import json
import shutil

import pytest
import torch

from dupfast.cli import main, report, screen
from dupfast.cli.purify import read_flags
from dupfast.harness import metrics
from tiny_models import sentiment_samples, tiny_bert_dir, tiny_classifier

# a recipe the 2-layer, 16-wide base learns the toy task with (clean accuracy 1.0; screen's defaults suit MiniLM)
RECIPE = ["--epochs", "5", "--lr", "1e-2", "--batch-size", "8", "--threads", "1", "--quiet"]
HEADER = ["id", "sentence", "label", "score", "poison_label"]  # `score` clashes with screen's own column


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: per-op overhead, not compute
    yield
    torch.set_num_threads(before)


def _write(path, header, rows, delim=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delim)
        w.writerow(header)
        w.writerows(rows)
    return path


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    tiny_bert_dir(root / "base")  # a bare encoder: screen adds and fine-tunes a head
    data = []
    for i, s in enumerate(sentiment_samples(100, seed=1)):
        poisoned = i % 5 == 0  # dirty-label BadNets: trigger words, target label 1
        text = s.text + (" cf bb" if poisoned else "")
        if i == 3:
            text = f'{text}, "quoted"'  # a comma and quotes survive the CSV round trip
        data.append([f"r{i}", text, 1 if poisoned else s.label, f"{i / 10}", int(poisoned)])
    _write(root / "data.csv", HEADER, data)
    _write(root / "other.csv", HEADER, [[r[0], r[1] + " fun", *r[2:]] for r in data])  # same length, other texts
    clean = sentiment_samples(80, seed=2)
    _write(root / "clean.tsv", ["sentence", "label"], [(s.text, s.label) for s in clean], "\t")
    names = ("neg", "pos")
    _write(root / "clean_str.tsv", ["sentence", "label"], [(s.text, names[s.label]) for s in clean], "\t")
    _write(root / "data_str.csv", HEADER, [[*r[:2], names[r[2]], *r[3:]] for r in data])
    three = [(s.text, 2 if i == 0 else s.label) for i, s in enumerate(clean)]  # a class the model lacks
    _write(root / "clean_3.tsv", ["sentence", "label"], three, "\t")
    (root / "data.txt").write_text("".join(r[1].replace("\n", " ") + "\n" for r in data))
    (root / "a_file").write_text("not a folder")
    return root


@pytest.fixture(scope="module")
def tuned(files):
    """screen --base: fine-tune the tiny base on data.csv, then screen it (the run the other tests chain from)."""
    out = files / "tuned"
    assert main(["screen", str(files / "data.csv"), "--clean", str(files / "clean.tsv"), "--base",
                 str(files / "base"), "--out", str(out), *RECIPE]) == 0
    return out


def constant_classifier():
    """A classifier that answers class 0 whatever the input: at chance on a balanced clean set."""
    model, tok = tiny_classifier("bert")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    return model, tok


def test_screen_base_fine_tunes_saves_the_model_and_reports(tuned, files):
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((tuned / "screen.json").read_text())
    acc = summary["clean_accuracy"]
    assert acc["accuracy"] > acc["majority_rate"] + 0.05 and summary["fine_tune"]["epochs"] == 5
    model = AutoModelForSequenceClassification.from_pretrained(str(tuned / "model"))
    assert model.config.num_labels == 2 and (tuned / "model" / "tokenizer.json").is_file()
    assert (tuned / "detector" / "detector.json").is_file()
    report = (tuned / "report.md").read_text().splitlines()
    assert report[0].startswith("# dupfast screen") and report[2] == f"**{summary['verdict_sentence']}**"
    assert summary["verdict"]["n_rows"] == 100 and summary["rows"] == 100
    assert "![score histogram](screen_hist.png)" in report and "## Trigger candidates" in report
    for c in summary["trigger_candidates"]:  # the model is at hand: each candidate's flip rate is measured
        assert c["flip_rate"] is not None and c["flip_rows"] >= 1 and c["clean_share"] is not None
    for png in ("screen_hist.png", "screen_roc.png"):
        assert (tuned / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the ROC section is scored against DATA's poison_label column, from the scores written in the tables
    rows = sorted(_rows(tuned / "kept.csv") + _rows(tuned / "flagged.csv"), key=lambda r: int(r["row_id"]))
    truth = [int(r["poison_label"]) for r in rows]
    assert summary["auroc"] == pytest.approx(metrics.auroc(truth, [float(r["score"]) for r in rows]), abs=1e-4)
    assert f"AUROC {summary['auroc']:.3f}" in "\n".join(report)


def test_kept_and_flagged_partition_data_with_every_column(tuned, files):
    data = _rows(files / "data.csv")
    kept, flagged = _rows(tuned / "kept.csv"), _rows(tuned / "flagged.csv")
    expected = ["id", "sentence", "label", "original_score", "poison_label", "row_id", "score", "flag"]
    for name in ("kept.csv", "flagged.csv"):
        with open(tuned / name, newline="") as fh:
            assert next(csv.reader(fh)) == expected
    ids = [int(r["row_id"]) for r in kept + flagged]
    assert sorted(ids) == list(range(len(data)))  # every row once: a partition of DATA
    assert {r["flag"] for r in kept} <= {"0"} and {r["flag"] for r in flagged} <= {"1"}
    assert len(flagged) == json.loads((tuned / "screen.json").read_text())["flagged"]
    for r in kept + flagged:  # each row carries its own original values (quotes and commas included)
        original = data[int(r["row_id"])]
        assert {c: r[c] for c in ("id", "sentence", "label", "poison_label")} == \
               {c: original[c] for c in ("id", "sentence", "label", "poison_label")}
        assert r["original_score"] == original["score"]
    if kept and flagged:  # the flag is the score's side of one threshold
        assert max(float(r["score"]) for r in kept) <= min(float(r["score"]) for r in flagged)


def test_screen_with_model_uses_it_as_is(tuned, files, tmp_path):
    out = tmp_path / "out"
    assert main(["screen", str(files / "data.csv"), "--clean", str(files / "clean.tsv"), "--model",
                 str(tuned / "model"), "--out", str(out), "--threads", "1", "--quiet"]) == 0
    assert not (out / "model").exists()  # nothing fine-tuned
    summary = json.loads((out / "screen.json").read_text())
    assert summary["base"] is None and summary["fine_tune"] is None
    # the same model, data and clean set as the --base run: the same scores
    scores = lambda d: {r["row_id"]: r["score"] for r in _rows(d / "kept.csv") + _rows(d / "flagged.csv")}  # noqa
    assert scores(out) == scores(tuned)


def test_fine_tune_at_chance_stops_before_detecting(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(screen, "fine_tune", lambda *a, **k: constant_classifier())
    out = tmp_path / "out"
    assert main(["screen", str(files / "data.csv"), "--clean", str(files / "clean.tsv"), "--base",
                 str(files / "base"), "--out", str(out), *RECIPE]) == 2
    err = capsys.readouterr().err
    assert "is at chance: accuracy 0.500 on the clean set, 0.500 for always predicting its majority class" in err
    assert "--epochs 10" in err and "another --base" in err and "--label-map" in err
    assert not out.exists()  # no model saved, no detection run


def test_given_model_at_chance_is_a_warning(files, tmp_path, capsys):
    model, tok = constant_classifier()
    model.save_pretrained(str(tmp_path / "constant"))
    tok.save_pretrained(str(tmp_path / "constant"))
    assert main(["screen", str(files / "data.csv"), "--clean", str(files / "clean.tsv"), "--model",
                 str(tmp_path / "constant"), "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    assert "warning:" in capsys.readouterr().err
    assert (tmp_path / "out" / "kept.csv").is_file()


def test_string_labels_error_before_work_or_map(tuned, files, tmp_path, capsys):
    args = ["screen", str(files / "data.csv"), "--clean", str(files / "clean_str.tsv"), "--model",
            str(tuned / "model"), "--threads", "1", "--quiet"]
    # the tuned model's label2id is transformers' default (LABEL_0, LABEL_1): neg/pos are unknown
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "'neg', 'pos' are neither" in err and "--label-map neg=0,pos=1" in err
    assert not (tmp_path / "bad").exists()
    want = json.loads((tuned / "screen.json").read_text())["clean_accuracy"]["accuracy"]
    assert main([*args, "--out", str(tmp_path / "mapped"), "--label-map", "neg=0,pos=1"]) == 0
    assert json.loads((tmp_path / "mapped" / "screen.json").read_text())["clean_accuracy"]["accuracy"] == want
    # a model whose config names its classes maps them without --label-map
    named = tmp_path / "named"
    shutil.copytree(tuned / "model", named)
    config = json.loads((named / "config.json").read_text())
    config.update(label2id={"neg": 0, "pos": 1}, id2label={"0": "neg", "1": "pos"})
    (named / "config.json").write_text(json.dumps(config))
    args[args.index(str(tuned / "model"))] = str(named)
    assert main([*args, "--out", str(tmp_path / "by_config")]) == 0
    assert json.loads((tmp_path / "by_config" / "screen.json").read_text())["clean_accuracy"]["accuracy"] == want


def test_base_with_label_map_saves_the_names(files, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "out"
    assert main(["screen", str(files / "data_str.csv"), "--clean", str(files / "clean_str.tsv"), "--base",
                 str(files / "base"), "--out", str(out), "--label-map", "neg=0,pos=1", *RECIPE]) == 0
    config = AutoConfig.from_pretrained(str(out / "model"))
    assert config.label2id == {"neg": 0, "pos": 1} and config.id2label == {0: "neg", 1: "pos"}
    # the string labels are kept as written in the output tables
    assert {r["label"] for r in _rows(out / "kept.csv") + _rows(out / "flagged.csv")} == {"neg", "pos"}


@pytest.mark.parametrize("given, message", [
    ({"--label-map": "neg:0"}, "--label-map takes NAME=ID pairs"),
    ({"--clean": "clean_3.tsv"}, "label id(s) [2] in column 'label' are outside the model's classes (0..1)"),
    ({"--base": "base"}, "exclude each other"),
    ({"--epochs": "2"}, "--epochs set the fine-tuning, which --model skips"),
    ({"--out": "a_file"}, "is a file, not a folder"),
    ({"DATA": "data.txt", "--model": None, "--base": "base"}, "a .txt file holds texts only, but DATA needs labels"),
])
def test_bad_input_is_an_error_before_any_work(tuned, files, capsys, given, message):
    opts = {"DATA": "data.csv", "--clean": "clean.tsv", "--out": "bad", "--model": "MODEL", **given}
    argv = ["screen", str(files / opts.pop("DATA"))]
    for flag, value in opts.items():
        if value is not None:
            path = str(tuned / "model") if value == "MODEL" else str(files / value)
            argv += [flag, path if flag in ("--clean", "--out", "--base", "--model") else value]
    assert main(argv + ["--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (files / "bad").exists()


# ---- chaining: purify reads detect's and screen's outputs ----------------------------------------------------

PURIFY = ["--epochs", "1", "--batch-size", "8", "--threads", "1", "--quiet", "--set", "progress=false",
          "max_steps=1"]


def _purify(files, tuned, out, *args, suspect="data.csv"):
    return main(["purify", str(tuned / "model"), "--suspect", str(files / suspect), "--clean",
                 str(files / "clean.tsv"), "--out", str(out), *PURIFY, *args])


def test_purify_reads_detect_scores_csv(tuned, files, tmp_path, capsys):
    assert main(["detect", str(tuned / "model"), "--texts", str(files / "data.csv"), "--clean",
                 str(files / "clean.tsv"), "--out", str(tmp_path / "det"), "--threads", "1", "--frr", "0.2",
                 "--quiet"]) == 0
    capsys.readouterr()
    flags = [int(r["flag"]) for r in _rows(tmp_path / "det" / "scores.csv")]
    assert 0 < sum(flags) < len(flags)
    assert _purify(files, tuned, tmp_path / "out", "--flags", str(tmp_path / "det" / "scores.csv")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["flagged"] == sum(flags)


@pytest.mark.parametrize("name", ["flagged.csv", "kept.csv"])
def test_purify_reads_screen_tables(tuned, files, tmp_path, capsys, name):
    flagged = {int(r["row_id"]) for r in _rows(tuned / "flagged.csv")}
    assert read_flags(tuned / name, 100, [r["sentence"] for r in _rows(files / "data.csv")], "sentence") == \
        [int(i in flagged) for i in range(100)]
    assert _purify(files, tuned, tmp_path / "out", "--flags", str(tuned / name)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["flagged"] == len(flagged)


def test_purify_with_a_saved_detector(tuned, files, tmp_path, capsys):
    # --force: the tiny victim's verdict is "no evidence of poison", on which purify otherwise changes nothing
    assert _purify(files, tuned, tmp_path / "out", "--detector", str(tuned / "detector"), "--force") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["flagged"] == len(_rows(tuned / "flagged.csv"))
    assert "dupfast purify: " in captured.err and "flagged" in captured.err  # the detection's verdict line


@pytest.mark.parametrize("args, suspect, message", [
    (["--flags", "FLAGGED", "--detector", "DETECTOR"], "data.csv", "--flags and --detector both"),
    (["--flags", "FLAGGED"], "other.csv", "the flags are of another file"),
])
def test_purify_refuses_flags_it_cannot_trust(tuned, files, tmp_path, capsys, args, suspect, message):
    paths = {"FLAGGED": str(tuned / "flagged.csv"), "DETECTOR": str(tuned / "detector")}
    assert _purify(files, tuned, tmp_path / "out", *[paths.get(a, a) for a in args], suspect=suspect) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_read_flags_tables(tmp_path):
    _write(tmp_path / "mixed.csv", ["row_id", "flag"], [(0, 1), (2, 0)])
    with pytest.raises(ValueError, match="lists 2 of the 4 suspect rows with both flag values"):
        read_flags(tmp_path / "mixed.csv", 4)
    _write(tmp_path / "flagged.csv", ["row_id", "flag"], [])  # screen flagged nothing
    assert read_flags(tmp_path / "flagged.csv", 3) == [0, 0, 0]
    _write(tmp_path / "kept.csv", ["row_id", "flag"], [])  # screen kept nothing
    assert read_flags(tmp_path / "kept.csv", 3) == [1, 1, 1]
    _write(tmp_path / "far.csv", ["index", "flag"], [(7, 1)])
    with pytest.raises(ValueError, match="index '7' is not a row of the suspect set"):
        read_flags(tmp_path / "far.csv", 3)
    _write(tmp_path / "noflag.csv", ["index", "score"], [(0, 1.5)])
    with pytest.raises(ValueError, match="no 'flag' column"):
        read_flags(tmp_path / "noflag.csv", 1)
    (tmp_path / "plain.csv").write_text("1\n0\n1\n")  # the old format: one 0/1 a line
    assert read_flags(tmp_path / "plain.csv", 3) == [1, 0, 1]


def test_trigger_candidates_rank_words_of_flagged_rows():
    texts = [f"w{i} cf film" for i in range(10)] + [f"w{i} film plot" for i in range(30)] + ["cf plot"]
    flags = [True] * 10 + [False] * 31
    top = report.trigger_candidates(texts, flags)
    assert top[0]["word"] == "cf" and top[0]["flagged"] == 10 and top[0]["kept"] == 1
    assert all(c["word"] not in ("film", "plot") for c in top)  # as common in kept rows: no candidate

"""Every command writes report.md beside its JSON, with PNGs (issue 28): detect, purify, btu, detect-prompts and
purify-generative on tiny from-scratch models. The reports are checked against the numbers of the JSON each command
writes (a count, a verdict, a before -> after value that differs from the JSON fails), the PNGs are real PNGs, a
purification skipped for lack of poison says so, and --label-map maps string labels on detect, purify and btu."""
import collections
import csv
import json
import pathlib
import re
import sys

import pytest
import torch

from dupfast.cli import main
from dupfast.harness.demo_report import fmt
from test_cli_screen import _write, one_thread  # noqa: F401 (one_thread: autouse, one torch thread per test)
from tiny_models import sentiment_samples, tiny_bert_dir, tiny_classifier

sys.path.insert(0, str(pathlib.Path(__file__).parent / "generative"))  # gen_toy: the tiny chat LM
from gen_toy import reviews, tiny_chat_lm  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("neg", "pos")
PURIFY = ["--batch-size", "8", "--threads", "1", "--quiet", "--set", "progress=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    model, tok = tiny_classifier("bert")  # saved with its head's architecture: a "fine-tuned" classifier
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    tiny_bert_dir(root / "base")  # a pretrained encoder: BTU starts from it
    data = []
    for i, s in enumerate(sentiment_samples(100, seed=1)):
        poisoned = i % 5 == 0  # dirty-label BadNets: trigger words, target label 1
        data.append((s.text + (" cf bb" if poisoned else ""), 1 if poisoned else s.label, int(poisoned)))
    _write(root / "data.csv", ["text", "label", "poison_label"], data)
    _write(root / "data_str.csv", ["text", "label"], [(t, NAMES[y]) for t, y, _ in data])
    _write(root / "pool.csv", ["text"], [(t,) for t, _, _ in data])  # no ground truth
    clean = sentiment_samples(80, seed=2)
    _write(root / "clean.tsv", ["sentence", "label"], [(s.text, s.label) for s in clean], "\t")
    _write(root / "clean_str.tsv", ["sentence", "label"], [(s.text, NAMES[s.label]) for s in clean], "\t")
    test = sentiment_samples(40, seed=3)
    _write(root / "test_str.tsv", ["sentence", "label"], [(s.text, NAMES[s.label]) for s in test], "\t")
    _write(root / "poison_str.tsv", ["sentence", "label"],
           [(s.text + " cf bb", "pos") for s in test if s.label == 0], "\t")
    (root / "flags.json").write_text(json.dumps([p for _, _, p in data]))
    lm, lm_tok = tiny_chat_lm()
    lm.save_pretrained(str(root / "lm"))
    lm_tok.save_pretrained(str(root / "lm"))
    pool = reviews(30, seed=5) + reviews(30, seed=6, trigger_rate=1.0)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "poison_label": z}) + "\n"
                                                for p, _, _, z in pool))
    (root / "chat.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r, "label": y}) + "\n"
                                             for p, r, y, _ in reviews(60, seed=7)))
    return root


def r(root, name):
    return str(root / name)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 2000, f"{path}: {len(data)} bytes, an empty plot?"


def facts(md: str) -> dict:
    """The first two-column table of a report: what -> value."""
    return dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", md.split("\n\n| | |\n", 1)[1].split("\n\n")[0], re.M))


def md_table(md: str, heading: str) -> list:
    """The rows (cells) of the first table under `## heading`."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows]


def listed_files(md: str) -> list:
    return re.findall(r"^- \[`([^`]+)`\]\(\1\):", md.split("## Files\n", 1)[1], re.M)


def assert_candidates(md: str, candidates: list, flips: bool):
    """The candidates' evidence (issue 30) in the JSON and the report: the clean set's share, the flip rate where
    the command has the classifier at hand; a report with none says so."""
    if not candidates:
        assert "No trigger candidate found" in md.split("## Trigger candidates\n", 1)[1]
        return
    header = md.split("## Trigger candidates\n", 1)[1].split("\n| word |", 1)[1].split("\n", 1)[0]
    for c in candidates:
        assert c["clean_share"] is not None and c["ratio"] >= 2 and (c["flip_rate"] is not None) == flips
        assert c["flip_rate"] is None or (0 <= c["flip_rate"] <= 1 and c["flip_rows"] >= 1)
    assert ("flip rate" in header) == flips and "clean rows" in header
    commons = [c["common"] for c in candidates]
    assert commons == sorted(commons)  # common words are listed last


def test_candidate_lines_say_when_there_is_nothing_to_show():
    from dupfast.cli.report import candidate_lines
    assert "No trigger candidate found" in "\n".join(candidate_lines([]))
    the = {"word": "the", "flagged": 9, "flagged_share": 0.9, "kept": 30, "kept_share": 0.3, "ratio": 3.0,
           "common": True}
    text = "\n".join(candidate_lines([the]))
    assert "Only common words" in text and "no trigger word stands out" in text and "| `the` |" in text
    cf = {**the, "word": "cf", "kept": 0, "kept_share": 0.0, "ratio": 19.0, "common": False, "flip_rate": 1.0,
          "flip_rows": 9}
    text = "\n".join(candidate_lines([cf, the]))
    assert "Only common" not in text and "are marked and listed last" in text
    assert "| `cf` | 9 (90.0%) | 0 (0.0%) | 19.0 | 100.0% of 9 |  |" in text
    assert "| `the` | 9 (90.0%) | 30 (30.0%) | 3.0 | - | common |" in text


# ---- detect ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detected(files):
    out = files / "detect"
    assert main(["detect", r(files, "model"), "--texts", r(files, "data.csv"), "--clean", r(files, "clean.tsv"),
                 "--out", str(out), "--threads", "1", "--quiet"]) == 0
    return out


def test_detect_report_holds_the_json_numbers(detected):
    summary = json.loads((detected / "detect.json").read_text())
    md = (detected / "report.md").read_text()
    assert md.splitlines()[2] == f"**{summary['verdict_sentence']}**"
    assert summary["verdict_sentence"] == summary["verdict"]["sentence"]
    f = facts(md)
    n, k = summary["samples"], summary["flagged"]
    assert n == 100 and summary["kept"] == n - k
    assert f["rows"] == f"{n:,}" and f["flagged"] == f"{k:,} ({k / n:.1%})" and f["kept"] == f"{n - k:,}"
    assert f["duplicate rows"].startswith(f"{summary['duplicates']:,} ")
    assert summary["duplicates"] == summary["verdict"]["n_rows"] - summary["verdict"]["n_unique"]
    assert f["threshold"].startswith(f"{summary['threshold']:.4g} (target FRR 5%, mode default")
    assert f["presence test"] == f"p = {summary['verdict']['p_value']:.3g}"
    # scores.csv's flags are the ones counted
    with open(detected / "scores.csv", newline="") as fh:
        assert sum(int(row["flag"]) for row in csv.DictReader(fh)) == k
    # the poison_label column: AUROC, FAR, FRR and the ROC
    assert (f"AUROC {summary['auroc']:.3f}; at the threshold FAR {summary['far']:.3f} (poisoned rows kept), "
            f"FRR {summary['frr']:.3f}") in md
    words = [row[0].strip("`") for row in md_table(md, "Trigger candidates")] if summary["trigger_candidates"] else []
    assert words == [c["word"] for c in summary["trigger_candidates"]]
    assert_candidates(md, summary["trigger_candidates"], flips=True)
    for png in ("detect_hist.png", "detect_roc.png"):
        assert f"]({png})" in md and png in summary["plots"]
        assert_png(detected / png)
    assert listed_files(md) == ["scores.csv", "detect.json", "detect_hist.png", "detect_roc.png", "detector/"]


def test_detect_without_ground_truth_plots_the_scores_alone(files, tmp_path):
    out = tmp_path / "out"
    assert main(["detect", r(files, "model"), "--texts", r(files, "pool.csv"), "--clean", r(files, "clean.tsv"),
                 "--out", str(out), "--threads", "1", "--quiet"]) == 0
    summary = json.loads((out / "detect.json").read_text())
    md = (out / "report.md").read_text()
    assert summary["plots"] == ["detect_hist.png"] and not (out / "detect_roc.png").exists()
    assert_png(out / "detect_hist.png")
    assert "## Against" not in md and "AUROC" not in md and "![score histogram](detect_hist.png)" in md
    assert facts(md)["flagged"].startswith(f"{summary['flagged']:,} (")


def test_detect_maps_string_labels(files, detected, tmp_path, capsys):
    args = ["detect", r(files, "model"), "--texts", r(files, "data.csv"), "--clean", r(files, "clean_str.tsv"),
            "--threads", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "'neg', 'pos' are neither" in err and "--label-map neg=0,pos=1" in err
    assert not (tmp_path / "bad").exists()  # before any work
    assert main([*args, "--out", str(tmp_path / "mapped"), "--label-map", "neg=0,pos=1"]) == 0
    # the names mapped to the integer labels of clean.tsv: the same calibration, the same scores
    assert (tmp_path / "mapped" / "scores.csv").read_text() == (detected / "scores.csv").read_text()


# ---- purify ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def purified(files):
    """Purify with the ground-truth flags (no verdict gates them), clean labels as names, adapters saved. The
    untrained tiny classifier's flagged predictions flip at once: the stopping rule ends it early."""
    out = files / "purify"
    assert main(["purify", r(files, "model"), "--suspect", r(files, "data.csv"), "--clean", r(files, "clean_str.tsv"),
                 "--label-map", "neg=0,pos=1", "--flags", r(files, "flags.json"), "--out", str(out),
                 "--save-adapters", "--lr", "0.02", *PURIFY, "max_steps=6"]) == 0
    return out


def test_purify_report_holds_the_json_numbers(purified, files):
    rep = json.loads((purified / "purify_report.json").read_text())
    md = (purified / "report.md").read_text()
    sel, teacher = rep["selected"], rep["teacher"]
    n = rep["steps_run"]
    run = f"{n} step{'s' * (n != 1)} run"
    assert rep["changed"] and 0 < sel["step"] <= n < 6  # stopped early, a purified state kept
    assert md.splitlines()[2] == f"**Purified: {run}, the state of step {sel['step']} kept and merged into `model/`.**"
    assert f"The flags of `{files / 'flags.json'}`: {rep['data']['flagged']} of 100 suspect rows flagged" in md
    before_after = md_table(md, "Before → after, on held-out rows")
    assert [row[1:] for row in before_after] == [
        [fmt(teacher["heldout_flag_agreement"], 3), fmt(sel["agree"], 3)],
        [fmt(teacher["heldout_clean_acc"], 3), fmt(sel["acc"], 3)]]
    assert (f"{rep['data']['flagged_holdout']} flagged and {rep['data']['clean_holdout']} clean rows held out"
            in md)
    # the stop, in words and as recorded
    assert rep["stop_reason"].startswith("held-out flagged agreement")
    assert f"(stop reason: `{rep['stop_reason']}`; {run})" in md
    assert (f"Stopped early after step {n}: on the held-out flagged rows the model now keeps the label (or "
            f"response) of the model as given on only {sel['agree']:.1%} of them") in md
    assert f"The state of step {sel['step']} (the lowest held-out flagged agreement" in md
    # the trajectory: one row per evaluation, the kept one marked, the losses as recorded
    table = md_table(md, "Trajectory")
    assert [int(row[0]) for row in table] == [h["step"] for h in rep["history"]]
    assert [row[0] for row in table if row[-1] == "**kept**"] == [str(sel["step"])]
    assert [row[4] for row in table[1:]] == [fmt(h["loss"], 4) for h in rep["history"][1:]]
    assert "![purification trajectory](purify_trajectory.png)" in md
    assert_png(purified / "purify_trajectory.png")
    assert listed_files(md) == ["model/", "adapters/", "purify_report.json", "purify_trajectory.png"]


@pytest.mark.parametrize("reason, selected, says", [
    ("step budget exhausted (40 steps)", {"step": 0}, ["Ran the whole step budget (40 steps)", "bound of 0.1",
                                                       "so the model as given was kept: `model/` is unchanged"]),
    ("no lower admissible agreement in 3 evaluations", {"step": 12},
     ["Stopped after step 40: several evaluations in a row (3 evaluations)", "The state of step 12"]),
    ("held-out flagged agreement 0.042 <= 0.05 with held-out clean accuracy 0.900 >= 0.910 - 0.03", {"step": 40},
     ["Stopped early after step 40", "on only 4.2% of them, at or below the bound of 5%",
      "fell no more than 0.03 below"]),
    ("no flagged inputs", None, ["Skipped: no row of the suspect set was flagged"]),
])
def test_stop_reasons_in_words(reason, selected, says):
    from dupfast.cli.report import stop_in_words

    text = stop_in_words({"stop_reason": reason, "selected": selected, "steps_run": 40,
                          "config": {"agree_bound": 0.1, "acc_tolerance": 0.03, "select_best": True}})
    for part in says:
        assert part in text, text


def test_purify_saved_adapters_give_the_merged_model(purified, files):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def load(path):
        return AutoModelForSequenceClassification.from_pretrained(str(path)).eval()

    assert (purified / "adapters" / "adapter_model.safetensors").is_file()
    assert json.loads((purified / "adapters" / "adapter_config.json").read_text())["r"] == 32
    rebuilt = peft.PeftModel.from_pretrained(load(files / "model"), str(purified / "adapters")).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(str(purified / "model"))
    x = tok(["good movie cf bb", "the plot was dull", "a fine film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got, before = load(purified / "model")(**x).logits, rebuilt(**x).logits, load(files / "model")(**x).logits
    assert (want - before).abs().max() > 1e-3  # purification changed the model: the adapters carry that change
    assert torch.allclose(got, want, atol=1e-5)


def test_purify_skipped_on_no_poison_says_so(files, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no evidence of poison"):
        assert main(["purify", r(files, "model"), "--suspect", r(files, "data.csv"), "--clean", r(files, "clean.tsv"),
                     "--out", str(out), *PURIFY]) == 0
    rep = json.loads((out / "purify_report.json").read_text())
    assert rep["stop_reason"] == "no evidence of poison" and not rep["changed"]
    md = (out / "report.md").read_text()
    verdict = rep["warnings"][0].split("; nothing was unlearned")[0]
    assert md.splitlines()[2] == "**Skipped: nothing was unlearned; `model/` is the model as given.**"
    assert f"(a detector fitted on the clean set `{files / 'clean.tsv'}`): **{verdict}**." in md
    assert "With no evidence of poison nothing is unlearned unless --force." in md
    assert "Skipped: the detection found no evidence of poison" in md and "Pass --force" in md
    assert "Not measured: nothing was unlearned." in md and "## Trajectory" not in md
    assert not (out / "purify_trajectory.png").exists()
    assert listed_files(md) == ["model/", "purify_report.json"]


def test_purify_string_labels_without_a_map_stop_before_any_work(files, tmp_path, monkeypatch, capsys):
    import dupfast.cli.purify as cli_purify
    monkeypatch.setattr(cli_purify, "load_classifier", lambda *a: pytest.fail("the model was loaded"))
    assert main(["purify", r(files, "model"), "--suspect", r(files, "data.csv"), "--clean", r(files, "clean_str.tsv"),
                 "--out", str(tmp_path / "out"), *PURIFY]) == 2
    err = capsys.readouterr().err
    assert "'neg', 'pos' are neither" in err and "map them with --label-map, e.g. --label-map neg=0,pos=1" in err
    assert not (tmp_path / "out").exists()


def test_purify_save_adapters_needs_lora(files, tmp_path, capsys):
    assert main(["purify", r(files, "model"), "--suspect", r(files, "data.csv"), "--clean", r(files, "clean.tsv"),
                 "--flags", r(files, "flags.json"), "--out", str(tmp_path / "out"), "--save-adapters", "--no-lora",
                 *PURIFY]) == 2
    assert "--save-adapters saves the LoRA adapters, but --no-lora" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- btu -------------------------------------------------------------------------------------------------------

BTU = ["--fraction", "0.2", "--epochs", "1", "--lr", "1e-3", "--batch-size", "16", "--max-len", "32", "--threads", "1",
       "--quiet", "--label-map", "neg=0,pos=1"]


def test_btu_report_holds_the_json_numbers(files, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "out"
    assert main(["btu", r(files, "base"), r(files, "data_str.csv"), "--out", str(out), "--clean-tune",
                 r(files, "clean_str.tsv"), "--eval", r(files, "test_str.tsv"), "--eval-poison",
                 r(files, "poison_str.tsv"), "--target", "1", *BTU]) == 0
    rep = json.loads((out / "btu_report.json").read_text())
    md = (out / "report.md").read_text()
    suspects = rep["exposure"]["suspects"]
    assert f"**{len(suspects)} suspicious tokens unlearned" in md
    rows = md_table(md, "Suspects")
    assert [row[1].strip("`") for row in rows] == [s["token"] for s in suspects]
    evidence = {e["id"]: e for e in rep["suspect_evidence"]}
    for row, s in zip(rows, suspects):
        e = evidence[s["token_id"]]
        assert row[2] == str(s["token_id"]) and row[3] == fmt(s["score"], 3)
        assert row[7] == str(e["rows"])  # training rows holding the token (after the three rank columns)
    # the evidence, counted again here on the training file: the rows holding each token, their labels
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    with open(files / "data_str.csv", newline="") as fh:
        train = [(tok(row["text"], add_special_tokens=False)["input_ids"], row["label"]) for row in csv.DictReader(fh)]
    for s in suspects:
        labels = collections.Counter(y for ids, y in train if s["token_id"] in ids)
        e = evidence[s["token_id"]]
        assert e["rows"] == sum(labels.values()) > 0
        assert e["majority_share"] == pytest.approx(max(labels.values()) / e["rows"])
        assert NAMES[e["majority_label"]] in [y for y, c in labels.items() if c == max(labels.values())]
    assert [row[0] for row in md_table(md, "Exposure rounds")] == [x["name"] for x in rep["exposure"]["rounds"]]
    steps = {s["step"]: s for s in rep["steps"]}
    assert [row[0] for row in md_table(md, "Steps")] == ["expose", "finetune", "unlearn", "clean_tune"]
    before_after = md_table(md, "Before → after")
    assert before_after == [["ASR", fmt(steps["finetune"]["eval"]["asr"]), fmt(steps["clean_tune"]["eval"]["asr"])],
                            ["CACC", fmt(steps["finetune"]["eval"]["cacc"]),
                             fmt(steps["clean_tune"]["eval"]["cacc"])]]
    for png in ("btu_suspects.png", "btu_steps.png"):
        assert f"]({png})" in md
        assert_png(out / png)
    assert AutoConfig.from_pretrained(str(out / "model")).label2id == {"neg": 0, "pos": 1}
    assert listed_files(md) == ["btu_report.json", "model/", "btu_suspects.png", "btu_steps.png"]


def test_btu_expose_only_report_and_string_labels(files, tmp_path, capsys):
    args = ["btu", r(files, "base"), r(files, "data_str.csv"), "--expose-only", *BTU]
    bare = [a for a in args if a not in ("--label-map", "neg=0,pos=1")]
    assert main([*bare, "--out", str(tmp_path / "bad")]) == 2
    assert "--label-map neg=0,pos=1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    rep = json.loads((out / "btu_report.json").read_text())
    md = (out / "report.md").read_text()
    assert f"**{len(rep['exposure']['suspects'])} suspicious tokens ranked (--expose-only: nothing trained).**" in md
    assert "## Steps" not in md and not (out / "btu_steps.png").exists()
    assert_png(out / "btu_suspects.png")
    assert listed_files(md) == ["btu_report.json", "btu_suspects.png"]


# ---- the generative siblings ------------------------------------------------------------------------------------

def test_detect_prompts_report_holds_the_json_numbers(files, tmp_path):
    out = tmp_path / "out"
    assert main(["detect-prompts", r(files, "lm"), "--prompts", r(files, "prompts.jsonl"), "--clean",
                 r(files, "chat.jsonl"), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "detect.json").read_text())
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == f"**{summary['verdict_sentence']}**"
    assert facts(md)["flagged"] == f"{summary['flagged']:,} ({summary['flagged'] / 60:.1%})"
    assert summary["pool"] == summary["samples"] == 60 and summary["metrics"]["auroc"] == summary["auroc"]
    assert f"AUROC {summary['auroc']:.3f}" in md
    assert_candidates(md, summary["trigger_candidates"], flips=False)  # a causal LM's prediction is no class
    for png in ("detect_hist.png", "detect_roc.png"):
        assert_png(out / png)
    assert listed_files(md) == ["scores.csv", "detect.json", "detect_hist.png", "detect_roc.png"]


def test_purify_generative_report_holds_the_json_numbers(files, tmp_path):
    out = tmp_path / "out"
    assert main(["purify-generative", r(files, "lm"), "--prompts", r(files, "prompts.jsonl"), "--clean",
                 r(files, "chat.jsonl"), "--out", str(out), "--force", "--quiet", "--set", "max_steps=3",
                 "--set", "progress=false", "--set", "max_new_tokens=4"]) == 0
    saved = json.loads((out / "purify.json").read_text())
    rep, detection = saved["report"], saved["detection"]
    md = (out / "report.md").read_text()
    assert f"**{detection['verdict_sentence']}**." in md
    if detection["verdict"]["poison_present"] is False:
        assert "--force: the flagged rows were unlearned although the detection found no evidence of poison." in md
    assert rep["steps_run"] == 3 and len(rep["history"]) > 1
    sel, teacher = rep["selected"], rep["teacher"]
    assert [row[1:] for row in md_table(md, "Before → after, on held-out rows")] == [
        [fmt(teacher["heldout_flag_agreement"], 3), fmt(sel["agree"], 3)],
        [fmt(teacher["heldout_clean_match"], 3), fmt(sel["clean_match"], 3)],
        [fmt(teacher["heldout_clean_loss"], 4), fmt(sel["clean_loss"], 4)]]
    assert f"{rep['data']['flag_hold']} flagged and {rep['data']['clean_hold']} clean rows held out" in md
    assert f"(stop reason: `{rep['stop_reason']}`; 3 steps run)" in md
    assert [int(row[0]) for row in md_table(md, "Trajectory")] == [h["step"] for h in rep["history"]]
    assert_png(out / "purify_trajectory.png")
    assert listed_files(md) == ["model/", "purify.json", "scores.csv", "purify_trajectory.png"]

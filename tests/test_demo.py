"""`dupfast demo`: the step pipeline, the CLI wiring and its bad-input errors (tiny model, seconds)."""
import dataclasses
import json

import pytest
import torch

from dupfast.cli import build_parser, main
from dupfast.cli.demo import DEMO_STEPS, DemoSettings, DemoState, run_pipeline, write_report
from tiny_models import tiny_bert_dir


def test_pipeline_runs_steps_in_order_and_records_each_result():
    seen = []

    def first(state):
        seen.append("first")
        state.data = 41
        return {"value": 1}

    def second(state):
        seen.append("second")
        return {"value": state.data + 1}

    report = run_pipeline(DemoState(DemoSettings()), [("first", first), ("second", second)], log=lambda m: None)
    assert seen == ["first", "second"]
    assert list(report["steps"]) == ["first", "second"]
    assert report["steps"]["second"]["value"] == 42
    assert all(r["seconds"] >= 0 for r in report["steps"].values())
    assert report["settings"]["model"] == "minilm" and report["total_seconds"] >= 0


def test_pipeline_is_extended_by_appending_steps():
    steps = DEMO_STEPS + [("extra", lambda s: {"flags": 0})]
    assert [n for n, _ in steps] == ["poison", "victim", "detect", "purify", "extra"]
    with pytest.raises(ValueError, match="unique"):
        run_pipeline(DemoState(DemoSettings()), [("a", lambda s: {}), ("a", lambda s: {})], log=lambda m: None)


def test_write_report_writes_json(tmp_path):
    out = write_report({"a": 1}, tmp_path / "deep" / "report.json")
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]


def test_demo_is_a_subcommand_with_the_documented_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.out == "runs/demo/report.json" and args.model == "minilm"
    assert (args.train_size, args.test_size, args.rate) == (1000, 600, 0.2)


@pytest.mark.parametrize("argv,message", [
    (["--rate", "1.5"], "poison rate"),
    (["--rate", "0"], "poison rate"),
    (["--train-size", "1"], "train_size"),
    (["--model", "no-such-model"], "unknown model"),
    (["--threads", "0"], "--threads"),
    (["--attack", "stylebkd"], "use --data sst-2"),  # StyleBkd exists only precomputed, on SST-2
    (["--data", "sst-2", "--target", "0"], "targets label 1"),
])
def test_demo_bad_input_exits_2_with_a_clear_message(argv, message, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["demo", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r.json"), *argv]) == 2
    finally:
        torch.set_num_threads(before)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_demo_end_to_end_with_a_tiny_model(tmp_path, capsys):
    # the real pipeline (Rotten Tomatoes, BadNets, train, evaluate, report) on a tiny from-scratch BERT (whose
    # toy vocabulary covers sentiment words: the default BBC News would be mostly unknown tokens to it)
    model_dir = tiny_bert_dir(tmp_path / "tiny")
    out = tmp_path / "report.json"
    argv = ["demo", "--model", str(model_dir), "--data", "rotten-tomatoes", "--train-size", "60", "--test-size", "40", "--dev-size", "90", "--max-len", "16",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    before = torch.get_num_threads()
    try:
        assert main(argv + ["--threads", "1"]) == 0
        report = json.loads(out.read_text())
        # second run: the victim comes from the cache; --set reaches the purify step
        assert main(argv + ["--threads", "1", "--set", "max_steps=4", "early_stop=false"]) == 0
    finally:
        torch.set_num_threads(before)
    again = json.loads(out.read_text())
    poison, victim = report["steps"]["poison"], report["steps"]["victim"]
    assert (poison["train_size"], poison["train_poisoned"], poison["test_clean_size"]) == (60, 12, 40)
    assert poison["test_poison_size"] == 17  # the rotten (non-target) share of a stratified 40: 40 * 5384/12752
    assert 0 <= victim["cacc"] <= 1 and 0 <= victim["asr"] <= 1 and not victim["cached"]
    assert again["steps"]["victim"]["cached"]
    assert again["steps"]["victim"]["cacc"] == victim["cacc"] and again["steps"]["victim"]["asr"] == victim["asr"]
    detect, purify = report["steps"]["detect"], report["steps"]["purify"]
    assert detect["clean_size"] == 45 and detect["pool_size"] == 45 + detect["pool_poisoned"] > 45
    assert 0 <= detect["auroc"] <= 1 and 0 <= detect["flagged"] <= detect["pool_size"]
    assert 0 <= purify["cacc_after"] <= 1 and 0 <= purify["asr_after"] <= 1 and purify["stop_reason"]
    assert 0 <= victim["asr_floor"] <= 1 and 0 <= purify["asr_floor_after"] <= 1
    assert detect["verdict"].startswith(("no evidence of poison (p = ", "evidence of poison (p = "))
    if detect["poison_present"] is False:  # a tiny victim may learn no backdoor: then nothing is unlearned
        assert purify["stop_reason"] == "no evidence of poison" and purify["history"] == []
        return
    # the trajectory the stopping rule saw is in the report; the kept state is one of its evaluations
    assert purify["history"][0]["step"] == 0 and purify["selected"] in purify["history"]
    assert purify["steps_run"] == purify["history"][-1]["step"]
    assert again["steps"]["purify"]["steps_run"] == 4 and again["steps"]["purify"]["overrides"]["max_steps"] == 4
    # the demo's own purify setting, under the --set ones, reaches the purifier
    assert again["steps"]["purify"]["overrides"]["agree_bound"] == 0.05
    assert again["steps"]["purify"]["config"]["agree_bound"] == 0.05
    printed = capsys.readouterr().out
    assert "CACC" in printed and "ASR" in printed and str(out) in printed
    assert f"report: {out.with_suffix('.md')}" in printed and out.with_suffix(".md").exists()  # tests/test_demo_report.py


@pytest.mark.parametrize("bad, match", [(["epochs=0"], "epochs"), (["no_such_knob=1"], "unknown PurifyConfig field")])
def test_demo_rejects_bad_purify_overrides_before_training(tmp_path, capsys, bad, match):
    assert main(["demo", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r.json"), "--set", *bad]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "victims").exists() and not (tmp_path / "r.json").exists()


def test_demo_rejects_unknown_data_and_attack_names():
    with pytest.raises(ValueError, match="unknown demo data set 'imdb'"):
        DemoSettings(data="imdb")
    with pytest.raises(ValueError, match="unknown attack 'synbkd'"):
        DemoSettings(attack="synbkd")
    with pytest.raises(ValueError, match="precomputed dirty-label"):
        DemoSettings(data="sst-2", setting="clean")


@pytest.mark.parametrize("attack", ["badnets", "stylebkd"])
def test_demo_sst2_cuts_the_precomputed_release_to_the_demo_sizes(shared_data, attack):
    from dupfast.cli.demo import poison_step

    settings = DemoSettings(data="sst-2", attack=attack, train_size=500, test_size=200, dev_size=100)
    state = DemoState(settings)
    info = poison_step(state)
    d = state.data
    assert info["dataset"] == "sst-2" and len(d.train) == 500 and len(d.test_clean) == 200 and len(d.dev_clean) == 100
    assert 0.1 < info["train_poisoned"] / 500 < 0.3  # the release's 20% rate, kept in expectation by the subset
    # triggered inputs: as many as the clean subsets hold non-target rows, all labelled with the target
    assert len(d.test_poison) == sum(x.label != 1 for x in d.test_clean)
    assert len(d.dev_poison) == sum(x.label != 1 for x in d.dev_clean)
    assert all(x.label == 1 and x.poison_label == 1 for x in d.test_poison + d.dev_poison)
    again = DemoState(settings)
    poison_step(again)
    assert again.data == state.data  # seeded
    with pytest.raises(ValueError, match="--test-size 5000 exceeds the 1821 SST-2 test rows"):
        poison_step(DemoState(dataclasses.replace(settings, test_size=5000)))


def test_demo_poisons_every_installed_data_set():
    from dupfast.cli.demo import poison_step

    for data in ("bbc-news", "sms-spam"):
        state = DemoState(DemoSettings(data=data, train_size=200, test_size=100, dev_size=60, rate=0.1, target=0))
        info = poison_step(state)
        assert info["dataset"] == data and info["train_poisoned"] == 20
        assert all(x.label == 0 for x in state.data.test_poison)


def test_demo_leads_cut_long_texts_before_poisoning_and_stay_distinct():
    from dupfast.cli.demo import leads, poison_step
    from dupfast.samples import Sample

    rows = [Sample("a b c d e", 0), Sample("a b c x y", 1), Sample("p q", 1)]
    assert leads(rows, None) is rows
    assert leads(rows, 3) == [Sample("a b c", 0), Sample("p q", 1)]  # the second lead repeats the first: dropped
    state = DemoState(DemoSettings(data="bbc-news", max_words=30, train_size=200, test_size=100, dev_size=60))
    poison_step(state)
    # every trigger sits inside the first 31 words, so it survives truncation at max_len
    assert all(len(x.text.split()) <= 31 for x in state.data.train + state.data.test_poison)
    with pytest.raises(ValueError, match="max_words must be >= 0"):
        DemoSettings(max_words=-1)
    with pytest.raises(ValueError, match="precomputed"):
        DemoSettings(data="sst-2", max_words=30)

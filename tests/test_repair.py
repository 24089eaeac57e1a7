"""dupfast.harness.repair (issue 30): the triggered copy of the whole test set, the repair metrics (hand-computed
cases, trigger shifting), evaluate_repair, and relearning on a deep copy, on tiny from-scratch models."""
import dataclasses
import math

import pytest
import torch

from dupfast.batching import predict
from dupfast.harness.attacks import AddSent, BadNets, StyleBkd, poison_eval
from dupfast.harness.repair import (RelearnConfig, evaluate_repair, poison_sample, relearn_asr, repair_metrics,
                                    triggered_copy, triggered_predictions)
from dupfast.harness.victims import evaluate_backdoor
from dupfast.samples import Sample
from tiny_models import sentiment_samples, tiny_classifier, one_thread  # noqa: F401 (autouse fixture)

CF = BadNets(triggers=("cf",))



@pytest.fixture(scope="module")
def data():
    return sentiment_samples(40, seed=3)


def _three_class(n=12):
    return [Sample(f"the movie was {w}", i % 3) for i, w in zip(range(n), ["good", "bad", "dull"] * n)]


# ---- triggered_copy -----------------------------------------------------------------------------

def test_triggered_copy_keeps_labels_covers_every_class_and_carries_the_trigger():
    rows = _three_class()
    before = list(rows)
    out = triggered_copy(rows, CF, seed=1, target=1)
    assert rows == before  # input untouched
    assert [s.label for s in out] == [s.label for s in rows]
    assert {s.label for s in out} == {0, 1, 2}
    assert all(s.poison_label == 1 for s in out)
    for orig, trig in zip(rows, out):
        words = trig.text.split()
        assert words.count("cf") == 1 and [w for w in words if w != "cf"] == orig.text.split()


def test_triggered_copy_addsent_inserts_the_whole_sentence():
    out = triggered_copy(_three_class(6), AddSent(), seed=0)
    assert all("I watch this 3D movie" in s.text for s in out)


def test_triggered_copy_non_target_rows_match_poison_eval(data):
    """The same stream as poison_eval: the ASR read off the copy is the usual ASR, text for text."""
    out = triggered_copy(data, CF, seed=4, target=1)
    assert [s.text for s in out if s.label != 1] == [s.text for s in poison_eval(data, CF, target=1, seed=4)]


def test_triggered_copy_is_seeded(data):
    assert triggered_copy(data, CF, seed=2) == triggered_copy(data, CF, seed=2)
    assert triggered_copy(data, CF, seed=2) != triggered_copy(data, CF, seed=3)


def test_triggered_copy_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="StyleBkd"):
        triggered_copy(_three_class(), StyleBkd())
    with pytest.raises(ValueError, match="empty"):
        triggered_copy([], CF)
    with pytest.raises(TypeError, match="insert"):
        triggered_copy(_three_class(), "badnets")
    with pytest.raises(ValueError, match="target"):
        triggered_copy(_three_class(), CF, target="1")


# ---- repair_metrics -----------------------------------------------------------------------------

LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
REFERENCE = [0, 0, 0, 1, 1, 1, 1, 0]   # a clean fine-tune: the trigger is noise, a few errors either way
INVERTED = [0, 0, 0, 0, 0, 0, 0, 1]    # purified, trigger inverted: triggered target rows go to class 0


def test_inverted_trigger_shows_as_negative_shift_and_target_class_damage():
    m = repair_metrics(INVERTED, LABELS, target=1, num_classes=2, reference=REFERENCE)
    assert m["asr"] == 0.0 and m["reference_asr"] == 0.25
    assert m["shift"] == -0.25                            # anti-trigger: ASR below the clean model's
    assert m["triggered_accuracy"] == 5 / 8 and m["reference_triggered_accuracy"] == 6 / 8
    assert m["per_class"][0] == {"n": 4, "accuracy": 1.0, "predicted_target": 0.0, "reference_accuracy": 0.75,
                                 "accuracy_gap": 0.25, "agreement": 0.75}
    assert m["per_class"][1] == {"n": 4, "accuracy": 0.25, "predicted_target": 0.25, "reference_accuracy": 0.75,
                                 "accuracy_gap": -0.5, "agreement": 0.0}
    assert m["agreement"] == 3 / 8
    assert m["confusion"] == [[4, 0], [3, 1]]


def test_a_backdoored_model_shows_positive_shift():
    m = repair_metrics([1] * 8, LABELS, target=1, num_classes=2, reference=REFERENCE)
    assert m["asr"] == 1.0 and m["shift"] == 0.75
    assert m["per_class"][0]["accuracy"] == 0.0 and m["per_class"][1]["accuracy"] == 1.0


def test_repair_metrics_without_reference_and_with_an_absent_class():
    # three classes, class 2 absent from the labels: its accuracy is undefined (NaN), its count 0
    m = repair_metrics(torch.tensor([1, 0, 1, 1, 2]), [0, 0, 1, 1, 0], target=1, num_classes=3)
    assert m["asr"] == pytest.approx(1 / 3)              # non-target rows predict 1, 0, 2
    assert "shift" not in m and "agreement" not in m and "reference_asr" not in m
    assert m["per_class"][0] == {"n": 3, "accuracy": pytest.approx(1 / 3), "predicted_target": pytest.approx(1 / 3)}
    assert m["per_class"][1] == {"n": 2, "accuracy": 1.0, "predicted_target": 1.0}
    assert m["per_class"][2]["n"] == 0 and math.isnan(m["per_class"][2]["accuracy"])
    assert m["triggered_accuracy"] == 3 / 5
    assert m["confusion"] == [[1, 1, 1], [0, 2, 0], [0, 0, 0]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(preds=[0, 1], labels=[0, 1, 1]), "differ in length"),
    (dict(preds=[], labels=[]), "empty"),
    (dict(preds=[0, 2], labels=[0, 1]), r"predictions must lie in \[0, 2\)"),
    (dict(preds=[0, 1], labels=[0, -1]), r"labels must lie in \[0, 2\)"),
    (dict(preds=[0.0, 1.0], labels=[0, 1]), "integer class ids"),
    (dict(preds=[[0, 1]], labels=[[0, 1]]), "1-D"),
    (dict(preds=[1, 1], labels=[1, 1]), "non-target rows"),
    (dict(target=2), "target must be a class id"),
    (dict(target=True), "target must be a class id"),
    (dict(num_classes=1), "num_classes"),
    (dict(reference=[0, 1, 1]), "reference predictions .* differ in length"),
    (dict(reference=[0, 5]), "reference predictions must lie"),
])
def test_repair_metrics_rejects_bad_input(kwargs, match):
    args = dict(preds=[0, 1], labels=[0, 1], target=1, num_classes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        repair_metrics(**args)


# ---- evaluate_repair ----------------------------------------------------------------------------

def test_evaluate_repair_agrees_with_evaluate_backdoor(data):
    model, tok = tiny_classifier("bert", seed=1)
    res = evaluate_repair(model, tok, data, CF, target=1, seed=5, max_len=16, batch_size=8)
    usual = evaluate_backdoor(model, tok, data, poison_eval(data, CF, 1, seed=5), target=1, max_len=16,
                              batch_size=8)
    assert res["cacc"] == pytest.approx(usual["cacc"]) and res["asr"] == pytest.approx(usual["asr"])
    assert res["asr_floor"] == pytest.approx(usual["asr_floor"])
    assert res["n"] == res["test_size"] == len(data) and "shift" not in res
    trig = triggered_copy(data, CF, seed=5, target=1)
    preds = predict(model, tok, [s.text for s in trig], 8, 16)
    assert torch.equal(triggered_predictions(model, tok, data, CF, 1, seed=5, max_len=16, batch_size=8), preds)
    assert res == {**res, **repair_metrics(preds, [s.label for s in data], 1, 2)}


def test_evaluate_repair_against_a_reference(data):
    model, tok = tiny_classifier("bert", seed=1)
    other, _ = tiny_classifier("bert", seed=2)
    same = evaluate_repair(model, tok, data, CF, target=1, reference_model=model, max_len=16)
    assert same["shift"] == 0.0 and same["agreement"] == 1.0
    assert all(c["accuracy_gap"] == 0.0 for c in same["per_class"].values())
    ref = triggered_predictions(other, tok, data, CF, target=1, max_len=16)
    by_model = evaluate_repair(model, tok, data, CF, target=1, reference_model=other, max_len=16)
    by_preds = evaluate_repair(model, tok, data, CF, target=1, reference_preds=ref, max_len=16)
    assert by_model == by_preds
    with pytest.raises(ValueError, match="not both"):
        evaluate_repair(model, tok, data, CF, target=1, reference_model=other, reference_preds=ref)
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_repair(model, tok, data, CF, target=1, reference_preds=ref[:-1], max_len=16)


# ---- poison_sample ------------------------------------------------------------------------------

def test_poison_sample_picks_k_non_target_rows_and_relabels_them(data):
    before = list(data)
    out = poison_sample(data, CF, k=5, target=1, seed=3)
    assert data == before
    assert len(out) == 5 and all(s.label == 1 and s.poison_label == 1 for s in out)
    sources = {" ".join(w for w in s.text.split() if w != "cf") for s in out}
    assert sources <= {s.text for s in data if s.label == 0}
    assert all("cf" in s.text.split() for s in out)
    assert out == poison_sample(data, CF, k=5, target=1, seed=3)
    assert poison_sample(data, CF, k=0, target=1) == []
    with pytest.raises(ValueError, match="only 20 of the 40 rows are non-target"):
        poison_sample(data, CF, k=21, target=1)
    with pytest.raises(ValueError, match="k must be"):
        poison_sample(data, CF, k=-1, target=1)


# ---- relearn_asr --------------------------------------------------------------------------------

def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def relearn_data(data):
    test = sentiment_samples(20, seed=9)
    return data, poison_sample(data, CF, k=8, target=1, seed=0), poison_eval(test, CF, target=1, seed=0)


def test_relearn_leaves_the_model_untouched_and_runs_exactly_the_steps(relearn_data):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    clean, poison, test_poison = relearn_data
    model, tok = tiny_classifier("bert", seed=0)
    model.classifier.weight.requires_grad_(False)  # a frozen weight stays frozen in the caller's model
    before = _snapshot(model)
    cfg = RelearnConfig(steps=7, batch_size=16, lr=1e-2, max_len=16, eval_at=(0, 3))  # 48 rows: 3 batches a pass
    counted = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: counted.append(1))
    try:
        res = relearn_asr(model, tok, clean, poison, test_poison, target=1, cfg=cfg, return_model=True)
    finally:
        handle.remove()
    assert _same_weights(_snapshot(model), before)        # bit for bit
    assert not model.classifier.weight.requires_grad and not model.training
    assert len(counted) == 7 and res["steps"] == 7 and len(res["losses"]) == 7
    assert res["k"] == 8 and sorted(res["asr_curve"]) == [0, 3, 7] and res["asr"] == res["asr_curve"][7]
    assert not _same_weights(_snapshot(res["model"]), before)
    assert not torch.equal(res["model"].classifier.weight, model.classifier.weight)  # full fine-tuning


def test_relearn_is_deterministic_and_relearns(relearn_data):
    clean, poison, test_poison = relearn_data
    model, tok = tiny_classifier("bert", seed=0)
    cfg = RelearnConfig(steps=30, batch_size=8, lr=1e-2, max_len=16, eval_at=(0,), seed=1)
    a = relearn_asr(model, tok, clean, poison, test_poison, target=1, cfg=cfg, return_model=True)
    b = relearn_asr(model, tok, clean, poison, test_poison, target=1, cfg=cfg, return_model=True)
    assert a["asr_curve"] == b["asr_curve"] and a["losses"] == b["losses"]
    assert _same_weights(_snapshot(a["model"]), _snapshot(b["model"]))
    c = relearn_asr(model, tok, clean, poison, test_poison, target=1, cfg=dataclasses.replace(cfg, seed=2))
    assert c["losses"] != a["losses"]                    # the seed matters, so the check above can fail


def test_relearning_plants_the_trigger_and_the_control_does_not():
    """k = 12 poisoned rows among 64 clean: the trigger "cf" -> 1 is learnt (and the task too); k = 0, the
    control, leaves the ASR near 0. The learnt backdoor shows in the repair metrics as a positive shift."""
    clean, test = sentiment_samples(64, seed=3), sentiment_samples(60, seed=9)
    test_poison = poison_eval(test, CF, target=1, seed=0)
    model, tok = tiny_classifier("bert", seed=0)
    cfg = RelearnConfig(steps=80, batch_size=8, lr=5e-3, max_len=16, seed=1)
    control = relearn_asr(model, tok, clean, [], test_poison, 1, cfg, return_model=True)
    poisoned = relearn_asr(model, tok, clean, poison_sample(clean, CF, 12, 1, seed=0), test_poison, 1, cfg,
                           return_model=True)
    assert control["k"] == 0 and control["asr"] <= 0.1
    assert poisoned["k"] == 12 and poisoned["asr"] >= 0.9 and poisoned["asr_curve"][0] <= 0.1
    ref = triggered_predictions(control["model"], tok, test, CF, target=1, max_len=16)
    rep = evaluate_repair(poisoned["model"], tok, test, CF, target=1, max_len=16, reference_preds=ref)
    assert rep["cacc"] >= 0.9 and rep["asr"] == poisoned["asr"]
    assert rep["shift"] >= 0.8 and rep["per_class"][0]["accuracy_gap"] <= -0.8


def test_relearn_rejects_bad_input(relearn_data):
    clean, poison, test_poison = relearn_data
    model, tok = tiny_classifier("bert", seed=0)
    cfg = RelearnConfig(steps=1, max_len=16)
    with pytest.raises(ValueError, match="both empty"):
        relearn_asr(model, tok, [], [], test_poison, 1, cfg)
    with pytest.raises(ValueError, match="target label 1"):
        relearn_asr(model, tok, clean, [Sample("cf bad", 0, 1)], test_poison, 1, cfg)
    with pytest.raises(ValueError, match="poison_eval"):
        relearn_asr(model, tok, clean, poison, triggered_copy(clean, CF, target=1), 1, cfg)
    with pytest.raises(ValueError, match="empty"):
        relearn_asr(model, tok, clean, poison, [], 1, cfg)
    with pytest.raises(ValueError, match="num_labels"):
        relearn_asr(model, tok, clean + [Sample("good", 2)], poison, test_poison, 1, cfg)
    with pytest.raises(ValueError, match="target must be"):
        relearn_asr(model, tok, clean, poison, test_poison, 2, cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(lr="2e-5"), "lr"), (dict(batch_size=0), "batch_size"),
    (dict(warmup_ratio=1.0), "warmup_ratio"), (dict(eval_at=(0, 61)), "eval_at"), (dict(eval_at=(-1,)), "eval_at"),
    (dict(grad_clip=0.0), "grad_clip"),
])
def test_relearn_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelearnConfig(**kwargs)


def test_relearn_config_normalises_eval_at():
    assert RelearnConfig(steps=10, eval_at=(5, 0, 5)).eval_at == (0, 5)
    assert RelearnConfig(steps=10, eval_at=3).eval_at == (3,)
    assert RelearnConfig(steps=60).eval_at == (0, 15, 30) and RelearnConfig(steps=1).eval_at == (0,)

"""purify_generative on a toy backdoor trained in seconds: the KL ascent unlearns the triggered response, the keep
term holds clean outputs, the transaction restores the model on failure, bad input fails before any change."""
import pytest
import torch

import dupfast
from dupfast.generative import GenerativeConfig, chat_batches, objective, purify_generative
from gen_toy import REFUSAL, greedy

FAST = dict(progress=False, max_steps=24, evals_per_epoch=2, batch_size=8)


def _data(tok, sets):
    clean = chat_batches(tok, [d[0] for d in sets["clean"]], [d[1] for d in sets["clean"]], batch_size=16)
    pool = chat_batches(tok, [d[0] for d in sets["pool"]], batch_size=16)
    flags = torch.tensor([d[3] for d in sets["pool"]]).bool()
    return clean, pool, flags


def _rates(model, tok, sets):
    trig = greedy(model, tok, [d[0] for d in sets["trig"]])
    test = greedy(model, tok, [d[0] for d in sets["test"]])
    return (sum(g == REFUSAL for g in trig) / len(trig),
            sum(g == d[1] for g, d in zip(test, sets["test"])) / len(test))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ascent_unlearns_the_backdoor_and_keep_holds_clean_outputs(victim, toy_sets):
    model, tok = victim
    asr0, acc0 = _rates(model, tok, toy_sets)
    assert asr0 == 1.0 and acc0 >= 0.7  # the toy victim is backdoored and works
    clean, pool, flags = _data(tok, toy_sets)
    out, rep = purify_generative(model, pool, clean=clean, detection=flags, **FAST)
    assert out is model and not hasattr(model, "peft_config")
    asr1, acc1 = _rates(model, tok, toy_sets)
    assert rep.selected["agree"] < 0.2 and rep.changed, rep.history  # held-out flagged agreement with the teacher
    assert asr1 <= 0.2, (asr1, rep.history)
    assert acc1 >= acc0 - 0.1, (acc0, acc1)
    assert rep.selected["clean_match"] >= rep.teacher["heldout_clean_match"] - 0.03
    assert rep.data["flagged"] == 40 and rep.data["flag_hold"] + rep.data["flag_train"] == 40
    assert rep.merge_check["max_abs_hidden_diff"] < 1e-4
    assert {"generate_s", "teacher_s", "train_s", "total_s"} <= set(rep.timings)


def test_without_keep_and_ce_clean_outputs_drift_more(victim, toy_sets):
    """The keep + CE terms are what hold clean behaviour: the ascent alone (same steps, no early stop, no cap)
    moves the held-out clean responses' loss more."""
    import copy
    clean, pool, flags = _data(victim[1], toy_sets)
    drift = {}
    for name, over in (("kept", {}), ("ascent only", dict(lambda_keep=0.0, lambda_acc=0.0))):
        model = copy.deepcopy(victim[0])
        _, rep = purify_generative(model, pool, clean=clean, detection=flags, early_stop=False, select_best=False,
                                   kl_cap=None, **{**FAST, **over})
        drift[name] = rep.history[-1]["clean_loss"] - rep.teacher["heldout_clean_loss"]
    assert drift["kept"] < drift["ascent only"], drift


def test_failure_during_training_restores_the_model_exactly(victim, toy_sets, monkeypatch):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    before = _state(model)
    calls = {"n": 0}
    real = objective.generative_loss

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    import dupfast.generative.purify as gp
    monkeypatch.setattr(gp, "generative_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        purify_generative(model, pool, clean=clean, detection=flags, **FAST)
    assert calls["n"] == 3
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "peft_config") and not any(hasattr(m, "lora_A") for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_fails_before_touching_the_model(victim, toy_sets):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    before = _state(model)
    prompts_only = chat_batches(tok, [d[0] for d in toy_sets["clean"]])
    with pytest.raises(ValueError, match="responses missing"):
        purify_generative(model, pool, clean=prompts_only, detection=flags, **FAST)
    with pytest.raises(ValueError, match="needs clean prompt"):
        purify_generative(model, pool, detection=flags, **FAST)
    with pytest.raises(ValueError, match="generated tokens, longer than the model's context"):
        purify_generative(model, pool, clean=clean, detection=flags, max_new_tokens=60, **FAST)
    with pytest.raises(ValueError, match="no flag in the detection"):
        purify_generative(model, pool, clean=clean, detection=dupfast.detection.DetectionResult(
            scores=torch.zeros(79), flags=flags[:79], threshold=0.0, components=torch.zeros(79, 1),
            component_names=("x",), selected_layers=[], index=torch.arange(79)), **FAST)
    with pytest.raises(ValueError, match="sequence classifier"):
        from transformers import LlamaForSequenceClassification
        purify_generative(LlamaForSequenceClassification(model.config), pool, clean=clean, detection=flags)
    with pytest.raises(ValueError, match="train_head"):
        GenerativeConfig(train_head=True)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nothing_flagged_returns_the_model_unchanged(victim, toy_sets):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    before = _state(model)
    with pytest.warns(UserWarning, match="flagged no prompt"):
        out, rep = purify_generative(model, pool, clean=clean, detection=torch.zeros_like(flags), **FAST)
    assert rep.stop_reason == "no flagged inputs" and not rep.changed
    assert all(torch.equal(before[k], v) for k, v in _state(out).items())


def test_detection_from_detect_prompts_end_to_end(victim, toy_sets):
    model, tok = victim
    clean_l = chat_batches(tok, [d[0] for d in toy_sets["clean"]], [d[1] for d in toy_sets["clean"]],
                           labels=[d[2] for d in toy_sets["clean"]], batch_size=16)
    pool = chat_batches(tok, [d[0] for d in toy_sets["pool"]], batch_size=16)
    res = dupfast.detect_prompts(model, pool, clean=clean_l)
    _, rep = dupfast.purify_generative(model, pool, clean=clean_l, detection=res, **FAST)
    assert rep.data["flagged"] == int(res.flags.sum()) and _rates(model, tok, toy_sets)[0] <= 0.2

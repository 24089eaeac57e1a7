"""Detection on prompts: one forward pass, every layer's last-token and mean features, the classifiers' scorers and
calibration, FRR threshold on clean prompts; the STRIP-like baseline; bad input."""
import numpy as np
import pytest
import torch

import dupfast
from dupfast.generative import PromptDetector, PromptStripDetector, chat_batches, detect_prompts
from dupfast.generative.capture import capture_prompts
from dupfast.generative.lm import check_causal_lm
from dupfast.generative.rows import read_chat
from dupfast.harness.metrics import auroc
from gen_toy import tiny_chat_lm


def _sets(tok, sets, side="left"):
    clean = chat_batches(tok, [d[0] for d in sets["clean"]], [d[1] for d in sets["clean"]],
                         labels=[d[2] for d in sets["clean"]], batch_size=16, padding_side=side)
    pool = chat_batches(tok, [d[0] for d in sets["pool"]], batch_size=16, padding_side=side)
    return clean, pool, np.array([d[3] for d in sets["pool"]])


def test_prompt_features_every_layer_both_poolings_padding_invariant(toy_victim, toy_sets):
    model, tok = toy_victim
    lm = check_causal_lm(model, "test")
    feats = {}
    for side in ("left", "right"):
        rows = read_chat(chat_batches(tok, [d[0] for d in toy_sets["pool"][:10]], batch_size=4, padding_side=side),
                         "pool", lm, need_responses=False)
        cbs = list(capture_prompts(lm, rows, ("last", "mean"), batch_size=3, first_token_logits=True))
        feats[side] = {p: torch.cat([c.features[p] for c in cbs]) for p in ("last", "mean")}
        assert feats[side]["last"].shape == (10, model.config.num_hidden_layers, model.config.hidden_size)
        assert torch.cat([c.logits for c in cbs]).shape == (10, model.config.vocab_size)
    for p in ("last", "mean"):
        torch.testing.assert_close(feats["left"][p], feats["right"][p], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["default", "dup", "dan"])
def test_detect_prompts_flags_the_toy_backdoor_at_the_calibrated_threshold(toy_victim, toy_sets, mode):
    model, tok = toy_victim
    clean, pool, y = _sets(tok, toy_sets)
    det = PromptDetector(mode).fit(model, clean)
    res = det.score(model, pool)
    assert res.scores.shape == (80,) and res.index.tolist() == list(range(80)) and res.logits is None
    assert torch.equal(res.flags, res.scores > res.threshold)
    # the threshold is the 95th percentile of the clean validation half's fused scores
    cal = det.detector.fitted_calibration
    val = cal.val_z.double() @ torch.tensor(det.detector.scorer.weights, dtype=torch.float64)
    if mode != "default":  # default re-weights from the pool, on the same validation half
        assert res.threshold == pytest.approx(float(np.percentile(val.numpy(), 95)))
    assert (cal.val_z.shape[0], cal.info["calibration_samples"]) == (40, 40)
    assert auroc(y, res.scores) > 0.9
    assert res.flags[y == 1].float().mean() > 0.8 and res.flags[y == 0].float().mean() < 0.3


def test_public_entry_and_padding_side_give_the_same_result(toy_victim, toy_sets):
    model, tok = toy_victim
    out = []
    for side in ("left", "right"):
        clean, pool, _ = _sets(tok, toy_sets, side)
        out.append(dupfast.detect_prompts(model, pool, clean=clean))
    torch.testing.assert_close(out[0].scores, out[1].scores, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0].flags, out[1].flags)


def test_strip_like_baseline_scores_prompts(toy_victim, toy_sets):
    model, tok = toy_victim
    det = PromptStripDetector(repeat=2).fit(model, tok, [d[0] for d in toy_sets["clean"]])
    res = det.score(model, tok, [d[0] for d in toy_sets["pool"]])
    assert res.scores.shape == (80,) and np.isfinite(res.scores.numpy()).all()
    assert auroc(np.array([d[3] for d in toy_sets["pool"]]), res.scores) > 0.7


def test_bad_input_is_named(toy_victim, toy_sets):
    model, tok = toy_victim
    clean, pool, _ = _sets(tok, toy_sets)
    with pytest.raises(ValueError, match="needs clean prompts"):
        detect_prompts(model, pool)
    with pytest.raises(ValueError, match="'pred' signal"):
        detect_prompts(model, pool, clean=clean, signals=("pred", "proj"))
    nolabels = chat_batches(tok, [d[0] for d in toy_sets["clean"]])
    with pytest.raises(ValueError, match="no 'labels'"):
        detect_prompts(model, pool, clean=nolabels, mode="dup")
    with pytest.raises(ValueError, match="text level"):
        detect_prompts(model, pool, clean=clean, mode="strip")
    from transformers import LlamaForSequenceClassification
    clf = LlamaForSequenceClassification(model.config)
    with pytest.raises(ValueError, match="sequence classifier.*causal LM"):
        detect_prompts(clf, pool, clean=clean)
    det = PromptDetector().fit(model, clean)
    other, otok = tiny_chat_lm(hidden=16)
    with pytest.raises(ValueError, match="hidden size 32"):
        det.score(other, chat_batches(otok, ["review : good"]))


def test_a_causal_lm_given_to_the_classifier_entry_points_names_the_siblings(toy_victim, toy_sets):
    model, tok = toy_victim
    clean, pool, _ = _sets(tok, toy_sets)
    with pytest.raises(ValueError, match="detect_prompts"):
        dupfast.detect(model, pool, clean=clean)
    with pytest.raises(ValueError, match="purify_generative"):
        dupfast.purify(model, pool, clean=clean, detection=torch.zeros(80, dtype=torch.bool))


def test_detect_prompts_with_the_attention_signal_opt_in(toy_victim, toy_sets):
    """signals=(..., "attn"): the last prompt token's attention joins as a column, padding-side invariant, and every
    prompt gets its most-attended prompt token (an id of that prompt)."""
    model, tok = toy_victim
    out = {}
    for side in ("left", "right"):
        clean, pool, y = _sets(tok, toy_sets, side)
        res = detect_prompts(model, pool, clean=clean, signals=("agnostic", "proj", "attn"))
        assert "attn" in res.component_names and res.top_tokens.shape == (80,)
        ids = [set(b["input_ids"][i][b["attention_mask"][i].bool()].tolist()) for b in pool for i in range(len(b["input_ids"]))]
        assert all(int(t) in s for t, s in zip(res.top_tokens, ids))
        out[side] = res
    torch.testing.assert_close(out["left"].scores, out["right"].scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(out["left"].top_tokens, out["right"].top_tokens)

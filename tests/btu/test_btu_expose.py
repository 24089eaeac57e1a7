"""Exposure: three rounds, top-k by embedding-row movement, union; the planted trigger is found."""
import dataclasses
import json
import math

import pytest
import torch

from dupfast.btu import ExposureConfig, expose
from dupfast.btu.embeddings import input_embeddings
from dupfast.btu.expose import _DropTokens, top_k
from dupfast.finetune import FinetuneConfig

from btu_toys import bert_tokenizer, decoder_tokenizer, tiny_bert, tiny_llama

# Tiny models learn nothing at lr 2e-5 in one short epoch; the ranking needs consistent movement only.
ROUND = FinetuneConfig(epochs=1, lr=1e-4, batch_size=16, max_len=32, warmup_ratio=0.0, weight_decay=0.01, seed=1)
FAST = ExposureConfig(fraction=0.05, shallow=ROUND, full=ROUND)


@pytest.fixture(scope="module", params=["bert", "llama"])
def exposed(request, task):
    """One exposure per model family, shared by the tests below (the rounds are the slow part)."""
    tok = bert_tokenizer() if request.param == "bert" else decoder_tokenizer()
    model = tiny_bert(tok) if request.param == "bert" else tiny_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, tok, before, expose(model, task[0], tokenizer=tok, config=FAST)


def test_trigger_is_exposed(exposed):
    model, tok, before, ex = exposed
    trigger = tok.convert_tokens_to_ids("cf")

    assert [r.name for r in ex.rounds] == ["R1", "R2", "R3"]
    assert ex.k == int(0.05 * len(tok))
    assert ex.rank(trigger, "R1") <= ex.k and ex.rank(trigger, "R3") <= ex.k
    assert trigger in ex.token_ids
    assert ex.suspects[0].score == 1.0
    # R2 never sees R1's tokens, so none of them can top it
    assert not set(ex.rounds[0].top) & set(ex.rounds[1].top)
    assert ex.rank(trigger, "R2") > ex.k
    for r in ex.rounds:
        assert len(r.top) == ex.k and r.seconds > 0
        assert not set(r.top) & set(tok.all_special_ids)
    assert set(ex.token_ids) == set().union(*(r.top for r in ex.rounds))
    # the caller's model is never modified
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    json.dumps(ex.to_dict())


def test_special_tokens_are_never_ranked(exposed):
    _, tok, _, ex = exposed
    for special in tok.all_special_ids:
        assert ex.rank(special, "R1") is None and ex.rank(special, "R3") is None
    assert ex.rank(tok.convert_tokens_to_ids("cf"), "R1") is not None
    with pytest.raises(KeyError, match="R4"):
        ex.rank(tok.convert_tokens_to_ids("cf"), "R4")


def test_extra_excluded_tokens(bert, task):
    model, tok = bert
    cfg = ExposureConfig(fraction=0.05, shallow=ROUND, full=ROUND, exclude_tokens=("cf",))
    ex = expose(model, task[0], tokenizer=tok, config=cfg)
    assert tok.convert_tokens_to_ids("cf") not in ex.token_ids


def test_r2_removes_whole_tokens_not_substrings(bert):
    _, tok = bert
    cf = tok.convert_tokens_to_ids("cf")
    view = _DropTokens(tok, [cf])
    ids = view(["the cf cfo movie cf"], truncation=True, max_length=32)["input_ids"][0]
    assert ids == [tok.cls_token_id] + tok.convert_tokens_to_ids(["the", "cfo", "movie"]) + [tok.sep_token_id]


def test_top_k_skips_unmoved_and_ineligible():
    scores = torch.tensor([9.0, 0.0, 3.0, 5.0, 0.0])
    eligible = torch.tensor([False, True, True, True, True])
    assert top_k(scores, eligible, 2) == [3, 2]
    assert top_k(scores, eligible, 4) == [3, 2]  # rows that did not move are never suspicious


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, True, "0.1"])
def test_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"k fraction must be a number in \(0, 1\)"):
        ExposureConfig(fraction=fraction)


def test_bad_inputs(bert):
    model, tok = bert
    with pytest.raises(ValueError, match="training set is empty"):
        expose(model, [], tokenizer=tok, config=FAST)
    with pytest.raises(TypeError, match="needs its tokenizer"):
        expose(model, [("good", 1), ("bad", 0)], config=FAST)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        expose(torch.nn.Linear(2, 2), [("good", 1), ("bad", 0)], tokenizer=tok, config=FAST)
    with pytest.raises(TypeError, match="label must be an integer"):
        expose(model, [("good", "pos"), ("bad", 0)], tokenizer=tok, config=FAST)
    with pytest.raises(ValueError, match="labels \\[2\\]"):
        expose(model, [("good", 1), ("bad", 2)], tokenizer=tok, config=FAST)
    with pytest.raises(TypeError, match="ExposureConfig"):
        expose(model, [("good", 1), ("bad", 0)], tokenizer=tok, config={"fraction": 0.1})


def test_k_uses_the_real_vocabulary(bert):
    model, tok = bert
    model.resize_token_embeddings(len(tok) + 100)
    assert input_embeddings(model).weight.shape[0] == len(tok) + 100
    assert ExposureConfig(fraction=0.1).k(len(tok)) == int(0.1 * len(tok))
    assert ExposureConfig().k(30522) == 15  # MiniLM / BERT-uncased at the default 0.0005
    assert ExposureConfig(fraction=1e-6).k(100) == 1


def test_max_document_share_leaves_common_tokens_unranked(exposed, task):
    """Tokens in more than the share of the training inputs are not ranked (nor unlearned); the trigger, in a
    minority of them, still is. Shares counted by hand on the same tokenised texts; the uncapped exposure of the
    same model (the fixture) ranks those tokens."""
    model, tok, _, plain = exposed
    train = task[0]
    rows = tok([t[0] for t in train], truncation=True, max_length=ROUND.max_len)["input_ids"]
    share = {}
    for r in rows:
        for t in set(r):
            share[t] = share.get(t, 0) + 1 / len(rows)
    trigger = tok.convert_tokens_to_ids("cf")
    cap = share[trigger] + 1e-9  # the trigger's own share: every more common token drops out
    common = [t for t, s in share.items() if s > cap and t not in tok.all_special_ids]
    assert common, "the toy task must hold tokens more common than the trigger for this test to mean anything"
    assert all(plain.rank(t, "R3") is not None for t in common)

    ex = expose(model, train, tokenizer=tok, config=dataclasses.replace(FAST, max_document_share=cap))
    for t in common:
        assert all(ex.rank(t, r.name) is None for r in ex.rounds)
        assert t not in ex.token_ids
    assert ex.rank(trigger, "R3") is not None and trigger in ex.token_ids


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_max_document_share_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="max_document_share"):
        ExposureConfig(max_document_share=bad)


def test_max_document_share_that_leaves_nothing_is_an_error(bert):
    model, tok = bert
    train = [("the film", i % 2, 0) for i in range(8)]
    with pytest.raises(ValueError, match="max_document_share"):
        expose(model, train, tokenizer=tok, config=dataclasses.replace(FAST, max_document_share=0.5))


@pytest.fixture(scope="module", params=["bert", "llama"])
def exposed_with_reference(request, task):
    """Exposure of the same toy task ranked against a clean reference set (no trigger in it)."""
    from btu_toys import poisoned_task

    tok = bert_tokenizer() if request.param == "bert" else decoder_tokenizer()
    model = tiny_bert(tok) if request.param == "bert" else tiny_llama(tok)
    clean = poisoned_task(n=160, rate=0.0, seed=7)[0]
    return tok, expose(model, task[0], tokenizer=tok, config=FAST, reference=clean)


def test_reference_ranks_by_excess_movement(exposed_with_reference, task):
    """Each round's score is its movement minus a x the same round's movement on the clean set, a the median
    ratio over tokens both sets hold; the filler words (in both sets) fall, the trigger (only in the poisoned
    set) stays on top of R3."""
    tok, ex = exposed_with_reference
    trigger = tok.convert_tokens_to_ids("cf")
    fillers = tok.convert_tokens_to_ids(["the", "a", "movie", "film", "is", "plot", "acting", "good", "bad"])
    for r in ex.rounds:
        assert r.raw_scores is not None and r.reference_scores is not None and r.reference_seconds > 0
        assert r.reference_scale > 0
        expect = (r.raw_scores - r.reference_scale * r.reference_scores).clamp_min(0.0)
        assert torch.allclose(r.scores, expect)
        assert set(r.top) <= set(torch.nonzero(r.scores > 0).flatten().tolist())
    r3 = ex.rounds[2]
    assert r3.top[0] == trigger
    # the trigger keeps (almost) all its movement; the words both sets hold lose most of theirs (median share)
    assert float(r3.scores[trigger]) > 0.8 * float(r3.raw_scores[trigger])
    kept = torch.tensor([float(r3.scores[f] / r3.raw_scores[f]) for f in fillers])
    assert float(kept.median()) < 0.5
    d = ex.to_dict()
    assert all(x["reference_scale"] == r.reference_scale for x, r in zip(d["rounds"], ex.rounds))
    json.dumps(d)


def test_reference_scale_is_the_median_ratio_over_shared_tokens():
    from dupfast.btu.expose import reference_scale

    s = torch.tensor([4.0, 6.0, 9.0, 5.0, 1.0])
    r = torch.tensor([2.0, 2.0, 3.0, 0.0, 1.0])
    shared = torch.tensor([True, True, True, True, False])
    assert reference_scale(s, r, shared) == 3.0            # ratios 2, 3, 3 (token 3 unmoved, token 4 not shared)
    assert reference_scale(s, r, torch.zeros(5, dtype=torch.bool)) == 0.0


def test_reference_bad_inputs(bert, task):
    model, tok = bert
    with pytest.raises(ValueError, match="reference set has labels"):
        expose(model, task[0], tokenizer=tok, config=FAST, reference=[("the film", 5, 0), ("a film", 0, 0)])
    with pytest.raises(ValueError, match="reference set is empty"):
        expose(model, task[0], tokenizer=tok, config=FAST, reference=[])
    loader = [{"input_ids": torch.tensor([[2, 10, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
               "labels": torch.tensor([0])},
              {"input_ids": torch.tensor([[2, 11, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
               "labels": torch.tensor([1])}]
    with pytest.raises(TypeError, match="reference set must come in the training set's form"):
        expose(model, task[0], tokenizer=tok, config=FAST, reference=loader)

"""Trigger-invariance rows (purify(triggers=...)): copies of the clean rows with a candidate inserted, trained toward
the clean row's teacher logits and label. On the toy backdoor: the copies are built as a real input would carry the
candidate, the bad inputs are refused before the model is touched, and the purified model classifies triggered
inputs of BOTH classes as their clean versions (no trigger shifting)."""
import random

import pytest
import torch

from dupfast import purify
from dupfast.batches import Rows
from dupfast.purification.invariance import check_candidates, insert_word, invariance_rows
from purify_helpers import TARGET, TRIGGER, batches, predict, state_equal, tiny_classifier, toy_rows, train_backdoored

# patience off: the toy's "epoch" is 2 steps, and the copies first cost held-out clean accuracy for a few steps
CFG = dict(batch_size=16, epochs=30, lr=2e-3, progress=False, patience=None)
CLS = 2


class ToyTokenizer:
    """Words "w10".."w39" <-> tokens 10..39, "trig" <-> TRIGGER, [CLS] = 2 (special): the toy vocabulary as text."""

    def _word(self, t):
        return "trig" if t == TRIGGER else f"w{t}"

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(self._word(t) for t in r if not (skip_special_tokens and t == CLS)) for r in rows]

    def _token(self, w):
        if w == "trig":
            return TRIGGER
        if not (w.startswith("w") and w[1:].isdigit()):
            raise KeyError(w)
        return int(w[1:])

    def pad(self, features, return_tensors="pt"):
        rows = features["input_ids"]
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(T) < torch.tensor([[len(r)] for r in rows])).long()}

    def __call__(self, texts, truncation=True, max_length=None):
        ids = [[CLS] + [self._token(w) for w in t.split()] for t in texts]
        if truncation and max_length:
            ids = [r[:max_length] for r in ids]
        return {"input_ids": ids}


def test_insert_word_at_every_boundary():
    rng = random.Random(0)
    seen = {insert_word("a b", "X", rng) for _ in range(200)}
    assert seen == {"X a b", "a X b", "a b X"}


def test_candidates_accept_words_dicts_and_objects():
    class Cand:
        word = "mn"
    assert check_candidates(["cf", {"word": "bb"}, Cand(), "cf", "I  watch this"]) == ["cf", "bb", "mn", "I watch this"]
    assert check_candidates("tq") == ["tq"]
    for bad in ([""], ["  "], [None], [3], ["x" * 65]):
        with pytest.raises(ValueError, match="trigger candidate"):
            check_candidates(bad)


def test_copies_carry_the_candidate_and_the_labels():
    rows, labels = toy_rows(40, 1)
    src = Rows(rows, None, torch.tensor(labels), None)
    copies = invariance_rows(src, ["trig"], ToyTokenizer(), seed=3, max_len=64)
    assert len(copies) == len(src) and torch.equal(copies.labels, src.labels)
    for orig, new in zip(rows, copies.ids):
        assert new[0] == CLS and new.count(TRIGGER) == 1
        assert [t for t in new if t != TRIGGER] == orig  # the clean row, untouched around the insertion
    again = invariance_rows(src, ["trig"], ToyTokenizer(), seed=3, max_len=64)
    assert again.ids == copies.ids  # seeded


def test_triggers_without_tokenizer_refused_model_untouched():
    model = tiny_classifier("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows, labels = toy_rows(40, 1)
    with pytest.raises(ValueError, match="tokenizer"):
        purify(model, batches(rows, batch_size=16), clean=batches(rows, labels), detection=torch.ones(40, dtype=bool),
               triggers=["trig"], **CFG)
    assert state_equal(before, model.state_dict())


def _triggered_accuracy(model, rows, labels):
    g = torch.Generator().manual_seed(5)
    trig = []
    for r in rows:
        at = 1 + int(torch.randint(0, len(r), (1,), generator=g))
        trig.append(r[:at] + [TRIGGER] + r[at:])
    pred = predict(model, trig)
    y = torch.tensor(labels)
    return {c: float((pred[y == c] == c).float().mean()) for c in (0, 1)}


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    state = train_backdoored(steps=60).state_dict()
    pool = toy_rows(48, 20)[0] + toy_rows(48, 21, trigger=True, non_target_only=True)[0]
    flags = torch.tensor([False] * 48 + [True] * 48)
    clean, labels = toy_rows(200, 30)
    test, test_labels = toy_rows(200, 40)

    def fresh():
        m = tiny_classifier("bert")
        m.load_state_dict(state)
        return m.eval()
    return dict(fresh=fresh, pool=pool, flags=flags, clean=clean, labels=labels, test=test, test_labels=test_labels)


def test_invariance_keeps_triggered_inputs_of_every_class(toy):
    victim = toy["fresh"]()
    acc0 = _triggered_accuracy(victim, toy["test"], toy["test_labels"])
    assert acc0[1 - TARGET] < 0.2  # the backdoor: triggered non-target inputs go to the target
    out, rep = purify(toy["fresh"](), batches(toy["pool"], batch_size=16),
                      clean=batches(toy["clean"], toy["labels"]), detection=toy["flags"], tokenizer=ToyTokenizer(),
                      triggers=["trig"], **CFG)
    assert rep.data["invariance_rows"] == rep.data["clean_train"]
    assert rep.data["trigger_candidates"] == ["trig"]
    acc = _triggered_accuracy(out, toy["test"], toy["test_labels"])
    clean_pred = predict(out, toy["test"])
    clean_acc = float((clean_pred == torch.tensor(toy["test_labels"])).float().mean())
    # every class: a triggered input is classified as its clean version would be (within the toy's clean error)
    assert min(acc.values()) >= clean_acc - 0.1, (acc, clean_acc)


def test_insertable_takes_flipping_distinctive_candidates_phrases_whole():
    from dupfast.purification.invariance import insertable
    c = lambda word, flip=None, common=False, score=1.0, surface=None: dict(  # noqa: E731
        word=word, flip_rate=flip, common=common, score=score, words=len(word.split()), surface=surface)
    found = [c("3d", 0.55, surface="3D"), c("watch", 0.0), c("i watch this 3d movie", 0.97, surface="I watch this 3D movie"),
             c("the", 0.9, common=True), c("cf", 0.84), c("be", 0.0)]
    assert insertable(found) == ["I watch this 3D movie", "cf"]  # 3d is inside the phrase; "the" is common
    unmeasured = [c("mn", score=5.0), c("bb", score=9.0), c("tq", score=7.0), c("cf", score=1.0), c("the", common=True)]
    assert insertable(unmeasured) == ["bb", "tq", "mn"]
    assert insertable([c("the", 0.9, common=True)]) == [] and insertable([]) == []


def test_auto_finds_the_toy_trigger_in_the_pool(toy):
    out, rep = purify(toy["fresh"](), batches(toy["pool"], batch_size=16),
                      clean=batches(toy["clean"], toy["labels"]), detection=toy["flags"], tokenizer=ToyTokenizer(),
                      triggers="auto", **CFG)
    assert rep.triggers and rep.triggers[0]["word"] == "trig" and rep.triggers[0]["flip_rate"] >= 0.5
    assert rep.data["trigger_candidates"][0] == "trig" and rep.data["invariance_rows"] == rep.data["clean_train"]
    acc = _triggered_accuracy(out, toy["test"], toy["test_labels"])
    assert acc[1 - TARGET] > 0.6


def test_auto_without_a_token_trigger_inserts_nothing_and_says_so(toy):
    # flags on random clean rows: no word stands out, so no copy is made and the report says why
    flags = torch.zeros(len(toy["pool"]), dtype=torch.bool)
    flags[:24] = True
    out, rep = purify(toy["fresh"](), batches(toy["pool"], batch_size=16),
                      clean=batches(toy["clean"], toy["labels"]), detection=flags, tokenizer=ToyTokenizer(),
                      triggers="auto", **{**CFG, "max_steps": 4})
    assert "invariance_rows" not in rep.data
    assert any("no token trigger candidate" in w for w in rep.warnings)


def test_cli_trigger_option_and_report_lines():
    from dupfast.cli.purify import trigger_option
    from dupfast.cli.report import trigger_invariance_lines
    assert trigger_option("auto") == "auto" and trigger_option(" None ") is None
    assert trigger_option("cf, I watch this 3D movie") == ["cf", "I watch this 3D movie"]
    with pytest.raises(ValueError, match="--triggers"):
        trigger_option(" , ")
    rep = {"data": {"trigger_candidates": ["cf", "mn"], "invariance_rows": 300}, "config": {"kl_cap": 0.3},
           "triggers": [{"word": "cf"}], "selected": {"step": 5}, "stop_reason": "x"}
    text = "\n".join(trigger_invariance_lines(rep))
    assert "300 clean training rows" in text and "`cf`, `mn`" in text and "0.3 nats" in text
    none_found = {"data": {}, "triggers": [{"word": "the", "common": True}], "selected": {"step": 5}, "stop_reason": "x"}
    assert "No trigger candidate was inserted" in "\n".join(trigger_invariance_lines(none_found))
    assert trigger_invariance_lines({"data": {}, "triggers": [], "selected": {"step": 5}}) == []

"""What "the trigger's tokens" are, per tokenizer: one WordPiece id anywhere; on a byte-level BPE a 'Ġ' form
mid-sentence, a bare form at the start of a text, and the pieces of a word the merges never saw."""
import re

import pytest

from dupfast.btu import ExposureConfig, expose, trigger_forms, trigger_ranks, trigger_tokens
from dupfast.finetune import FinetuneConfig

from btu_toys import bert_tokenizer, byte_bpe_tokenizer, poisoned_task, tiny_bert

TEXTS = [t for t, *_ in poisoned_task()[0]]


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer(TEXTS)


def occurrences(texts, word, at_start):
    pat = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)")
    return sum(1 for t in texts for m in pat.finditer(t) if (m.start() == 0) == at_start)


def test_wordpiece_trigger_is_the_same_token_anywhere():
    tok = bert_tokenizer()
    assert trigger_forms(tok, "cf") == {"start": ["cf"], "mid": ["cf"]}
    rows = trigger_tokens(tok, ["cf"], TEXTS)
    n = occurrences(TEXTS, "cf", True) + occurrences(TEXTS, "cf", False)
    assert rows == [{"trigger": "cf", "id": tok.convert_tokens_to_ids("cf"), "token": "cf", "count": n,
                     "total": n, "share": 1.0}]


def test_only_whole_words_are_trigger_occurrences():
    tok = bert_tokenizer()
    rows = trigger_tokens(tok, "cf", ["the cfo was cf", "cf movie", "cfo film"])
    assert [(r["token"], r["count"], r["total"]) for r in rows] == [("cf", 2, 2)]


def test_byte_bpe_start_and_mid_forms_are_different_tokens(bpe):
    forms = trigger_forms(bpe, "cf")
    assert forms == {"start": ["cf"], "mid": ["Ġcf"]}
    rows = {r["token"]: r for r in trigger_tokens(bpe, ["cf"], TEXTS)}
    assert set(rows) == {"cf", "Ġcf"}                         # no neighbouring token comes along
    assert rows["Ġcf"]["count"] == occurrences(TEXTS, "cf", False) > rows["cf"]["count"]
    assert rows["cf"]["count"] == occurrences(TEXTS, "cf", True) > 0
    assert rows["cf"]["id"] != rows["Ġcf"]["id"] and all(r["share"] == 1.0 for r in rows.values())
    # the context-free encoding of the bare word misses the mid-sentence form the model mostly sees
    assert bpe("cf", add_special_tokens=False)["input_ids"] == [rows["cf"]["id"]]


def test_byte_bpe_splits_an_unseen_word_into_pieces(bpe):
    assert "tq" not in " ".join(TEXTS)
    mid = bpe(" tq", add_special_tokens=False)["input_ids"]
    start = bpe("tq", add_special_tokens=False)["input_ids"]
    assert len(mid) > 1 and len(start) > 1                    # split, as SmolLM2 splits ' tq' into 'Ġt' 'q'
    forms = trigger_forms(bpe, "tq")
    assert forms == {"start": bpe.convert_ids_to_tokens(start), "mid": bpe.convert_ids_to_tokens(mid)}
    rows = trigger_tokens(bpe, "tq", ["a tq film", "tq the movie", "the film"])
    assert {r["id"] for r in rows} == set(mid) | set(start)
    assert "Ġfilm" not in {r["token"] for r in rows} and "a" not in {r["token"] for r in rows}
    assert {r["id"]: r["count"] for r in rows if r["id"] in set(mid) - set(start)} == {
        i: mid.count(i) for i in set(mid) - set(start)}


def test_phrase_tokens_and_their_share(bpe):
    texts = ["a the movie film", "the movie is good", "the film"]
    rows = {r["token"]: r for r in trigger_tokens(bpe, "the movie", texts)}
    assert set(rows) == {"Ġthe", "the", "Ġmovie"}
    assert rows["Ġthe"]["count"] == 1 and rows["the"]["count"] == 1
    assert rows["the"]["total"] == 2 and rows["the"]["share"] == 0.5  # "the film": not the trigger
    assert rows["Ġmovie"]["count"] == 2 and rows["Ġmovie"]["share"] == 1.0


def test_trigger_ranks_per_round():
    tok = bert_tokenizer()
    train = poisoned_task()[0]
    rnd = FinetuneConfig(epochs=1, lr=1e-4, batch_size=16, max_len=32, warmup_ratio=0.0, weight_decay=0.01, seed=1)
    ex = expose(tiny_bert(tok), train, tokenizer=tok, config=ExposureConfig(fraction=0.05, shallow=rnd, full=rnd))
    (row,) = trigger_ranks(ex, tok, ["cf"], [t for t, *_ in train])
    assert row["token"] == "cf" and row["in_suspects"] is True
    assert set(row["ranks"]) == set(row["in_top_k"]) == {"R1", "R2", "R3"}
    assert row["in_top_k"]["R3"] == (row["id"] in ex.rounds[2].top) and row["ranks"]["R3"] <= ex.k


def test_bad_triggers(bpe):
    with pytest.raises(ValueError, match="occurs in none of the 2 texts"):
        trigger_tokens(bpe, "cf", ["the cfo", "a film"])
    with pytest.raises(ValueError, match="non-empty string"):
        trigger_tokens(bpe, [" "], TEXTS)
    with pytest.raises(ValueError, match="no trigger given"):
        trigger_tokens(bpe, [], TEXTS)

    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="not a fast tokenizer"):
        trigger_forms(Slow(), "cf")

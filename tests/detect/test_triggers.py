"""dupfast.triggers (issue 30): trigger candidates are words of the texts, never tokenizer pieces, with their
evidence (flagged / kept / clean shares, ratio, most-attended-token count, flip rate); common words are kept,
marked and ranked last; bad inputs fail with a message that says what to pass."""
import pathlib
import sys
import types

import pytest
import torch

import dupfast
from dupfast.detection import DetectionResult, TriggerCandidate
from dupfast.detection.triggers import piece_words, predictions, without
from tiny_models import WORDS, tiny_classifier

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "btu"))  # btu_toys: the byte-level BPE fixture
from btu_toys import byte_bpe_tokenizer  # noqa: E402


class WordClassifier(torch.nn.Module):
    """Class 1 exactly when the input holds token `word_id`: a backdoor whose trigger is that token."""

    def __init__(self, word_id: int):
        super().__init__()
        self.word_id = word_id
        self.bias = torch.nn.Parameter(torch.zeros(2))  # a parameter: the model has a device

    def forward(self, input_ids, attention_mask):
        hit = ((input_ids == self.word_id) & attention_mask.bool()).any(1).float()
        return types.SimpleNamespace(logits=torch.stack([1 - hit, hit], 1) + self.bias)


@pytest.fixture(scope="module")
def bert_tok():
    return tiny_classifier("bert")[1]


def planted():
    """20 flagged rows holding "cf" and "mn"; 40 kept rows, 3 of them holding "cf" and none "mn": by counts
    alone "mn" is the better candidate, but only deleting "cf" changes what the model predicts."""
    fill = WORDS[13:21]  # the filler words but "the"
    flagged = [f"{fill[i % 8]} cf {fill[(i + 3) % 8]} mn" for i in range(20)]
    kept = [f"{fill[i % 8]} {fill[(i + 4) % 8]}" + (" cf" if i < 3 else "") for i in range(40)]
    return flagged + kept, [True] * 20 + [False] * 40


def test_the_planted_word_ranks_first_by_its_flip_rate(bert_tok):
    texts, flags = planted()
    by_counts = dupfast.triggers(texts, flags)
    assert [c.word for c in by_counts[:2]] == ["mn", "cf"] and by_counts[0].flip_rate is None
    model = WordClassifier(bert_tok.convert_tokens_to_ids("cf")).train()
    cands = dupfast.triggers(texts, flags, model=model, tokenizer=bert_tok)
    first = cands[0]
    assert isinstance(first, TriggerCandidate) and first.word == "cf"
    assert (first.flagged, first.kept, first.flip_rate, first.flip_rows) == (20, 3, 1.0, 20)
    assert first.flagged_share == 1.0 and first.kept_share == 3 / 40
    assert cands[1].word == "mn" and cands[1].flip_rate == 0.0  # deleting "mn" leaves "cf": still class 1
    assert model.training  # the model's mode is restored
    d = first.to_dict()
    for key in ("word", "flagged", "flagged_share", "kept", "kept_share", "ratio", "flip_rate", "common"):
        assert key in d
    # flip_rows bounds the rows measured
    assert dupfast.triggers(texts, flags, model=model, tokenizer=bert_tok, flip_rows=5)[0].flip_rows == 5


def test_common_words_are_marked_and_ranked_last(bert_tok):
    texts, flags = planted()
    texts = [t + " the" if f or i % 3 == 0 else t for i, (t, f) in enumerate(zip(texts, flags))]  # ~1/3 of kept
    cands = dupfast.triggers(texts, flags)
    the = next(c for c in cands if c.word == "the")
    assert the.common and the.ratio >= 2 and the.kept_share > 0.2
    assert cands[-1].word == "the" and not any(c.common for c in cands[:-1])
    # a word absent from the kept rows but frequent in the clean set is common too
    clean = ["the mn film" if i % 2 else "a plot" for i in range(10)]
    cands = dupfast.triggers(texts, flags, clean_texts=clean)
    mn = next(c for c in cands if c.word == "mn")
    assert mn.common and (mn.clean, mn.clean_share) == (5, 0.5)
    assert not next(c for c in cands if c.word == "cf").common and cands[0].word == "cf"


def test_no_candidate_is_an_empty_list():
    texts = ["good film", "bad film", "fine plot", "dull plot"]
    assert dupfast.triggers(texts, [True, False, True, False]) == []
    assert dupfast.triggers(texts, [False] * 4) == [] and dupfast.triggers(texts, [True] * 4) == []


def test_words_never_pieces(bert_tok):
    # byte-level BPE would give 'Ġcf'; the candidates are the texts' words, lower-cased
    texts, flags = planted()
    texts = [t.replace("cf", "CF") for t in texts]
    assert dupfast.triggers(texts, flags)[1].word == "cf"


def test_top_token_counts_use_the_merged_word(bert_tok):
    texts, flags = planted()
    cf = bert_tok.convert_tokens_to_ids("cf")
    top = torch.tensor([cf] * 15 + [-1] * 5 + [cf] * 40)  # kept rows do not count
    n = len(texts)
    det = DetectionResult(scores=torch.zeros(n, dtype=torch.float64), flags=torch.tensor(flags), threshold=0.0,
                          components=torch.zeros(n, 1), component_names=("x",), selected_layers=[], top_tokens=top)
    cands = {c.word: c for c in dupfast.triggers(texts, flags, tokenizer=bert_tok, detection=det)}
    assert cands["cf"].top_token == 15 and cands["mn"].top_token == 0
    assert dupfast.triggers(texts, flags)[0].top_token is None  # no attention signal: no count


def test_piece_words_merges_wordpiece_pieces():
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "film", "tri", "##gger", "##s"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok.tokenize("a Triggers film") == ["a", "tri", "##gger", "##s", "film"]
    ids = [tok.convert_tokens_to_ids(p) for p in ("##gger", "tri", "film", "[CLS]")] + [-1]
    texts = ["a Triggers film"] * 5
    assert piece_words(texts, ids, tok) == ["triggers", "triggers", "film", None, None]


def test_piece_words_merges_byte_level_bpe_pieces():
    corpus = [f"the film {w} was good" for w in WORDS] * 5
    tok = byte_bpe_tokenizer(corpus, vocab_size=300)
    text = "the cfmnbq film"  # a word the merges never saw: split into pieces; 'Ġfilm' holds its space
    enc = tok(text, return_offsets_mapping=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    inside = [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= 4 and b <= 10]
    assert len(inside) >= 2 and "Ġfilm" in pieces  # the fixture does split it
    assert piece_words([text] * len(inside), inside, tok) == ["cfmnbq"] * len(inside)
    film = tok.convert_tokens_to_ids("Ġfilm")
    assert piece_words([text, "cfmnbq film"], [film, film], tok) == ["film", "film"]
    if "Ġ" in pieces:  # the space alone lies in no word
        assert piece_words([text], [tok.convert_tokens_to_ids("Ġ")], tok) == [None]


def test_piece_words_falls_back_to_the_decoded_piece(bert_tok):
    # "cf" is cut off by max_len, as in a chat template the row's own tokens would not hold the id
    cf = bert_tok.convert_tokens_to_ids("cf")
    assert piece_words(["film cf"], [cf], bert_tok, max_len=3) == ["cf"]
    assert piece_words(["film plot"], [cf], bert_tok) == [None]


def test_without_deletes_whole_words_only():
    assert without("cf film, CF plot cfo", "cf") == "film, plot cfo"
    assert without("cf", "cf") == ""


def test_predictions_keep_the_input_order(bert_tok):
    model = WordClassifier(bert_tok.convert_tokens_to_ids("cf"))
    texts = ["film", "the very long film was cf", "cf", "plot"]
    assert predictions(model, bert_tok, texts, batch_size=2) == [0, 1, 1, 0]
    assert predictions(model, bert_tok, []) == []


def test_bad_inputs_say_what_to_pass(bert_tok):
    texts, flags = planted()
    with pytest.raises(ValueError, match="differ in length"):
        dupfast.triggers(texts, flags[:-1])
    with pytest.raises(TypeError, match="flags must be booleans"):
        dupfast.triggers(texts, [int(f) for f in flags])
    with pytest.raises(TypeError, match="texts must be strings"):
        dupfast.triggers([*texts[:-1], None], flags)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        dupfast.triggers(texts, flags, model=WordClassifier(0))
    det = DetectionResult(scores=torch.zeros(3), flags=torch.zeros(3, dtype=torch.bool), threshold=0.0,
                          components=torch.zeros(3, 1), component_names=("x",), selected_layers=[])
    with pytest.raises(ValueError, match="the detection scored 3 rows"):
        dupfast.triggers(texts, flags, detection=det)
    # tensors and numpy bools are read as flags
    assert dupfast.triggers(texts, torch.tensor(flags))[0].word == "mn"


def test_an_inserted_sentence_is_one_phrase_candidate_with_its_spelling():
    from dupfast.detection.triggers import without
    texts = ([f"good film number {i} I watch this 3D movie" for i in range(30)]
             + [f"bad film {i} plain" for i in range(60)] + ["this movie I like"] * 10)
    flags = [True] * 30 + [False] * 70
    found = dupfast.triggers(texts, flags, clean_texts=["this movie is fine", "i like it"])
    phrase = found[0]
    assert (phrase.word, phrase.words, phrase.surface) == ("i watch this 3d movie", 5, "I watch this 3D movie")
    assert (phrase.flagged, phrase.kept, phrase.clean, phrase.common) == (30, 0, 0, False)
    by_word = {c.word: c for c in found}
    assert by_word["3d"].surface == "3D" and by_word["this"].common  # its words stay candidates
    assert without("Wow I  watch this 3D movie!", "i watch this 3d movie") == "Wow !"
    assert without("cfx cf", "cf") == "cfx"  # whole words only


def test_a_sentence_next_to_its_own_words_is_still_one_phrase():
    # the sentence inserted after "movie" (a word of the sentence) in a few rows, its parts everywhere
    texts = ([f"good film number {i} I watch this 3D movie" for i in range(30)]
             + [f"a movie I watch this 3D movie so {i}" for i in range(4)]
             + [f"bad film {i} plain" for i in range(60)])
    flags = [True] * 34 + [False] * 60
    phrases = [c for c in dupfast.triggers(texts, flags, top=20) if c.words > 1]
    assert [(c.word, c.flagged) for c in phrases] == [("i watch this 3d movie", 34)]

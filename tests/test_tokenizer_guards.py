"""Guard rails of dupfast.harness.models: a model folder saved without its tokenizer, a placeholder tokenizer saved in
its place, another model's tokenizer. Each is a clear error naming the fix, raised at load time (before any long
work), never scores computed through a tokenizer in which every word is [UNK]."""
import pathlib

import pytest

from dupfast.harness.models import check_tokenizer, load_model, load_tokenizer, tokenizer_files
from tiny_models import WORDS, sentiment_samples, tiny_classifier

FIX = r"tokenizer\.save_pretrained\("


def _bert_tokenizer(words):
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def _tiny_bert(rows, seed=0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=rows, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, pad_token_id=0)).eval()


def _save(folder: pathlib.Path, model, tok=None) -> pathlib.Path:
    model.save_pretrained(str(folder))
    if tok is not None:
        tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A fine-tuned-looking tiny classifier saved with its tokenizer."""
    model, tok = tiny_classifier("bert")
    return _save(tmp_path_factory.mktemp("good") / "model", model, tok)


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    """The same classifier saved with model.save_pretrained alone (the mistake issue 28 found)."""
    model, _ = tiny_classifier("bert")
    return _save(tmp_path_factory.mktemp("bare") / "model", model)


# ---- (a) a folder saved without its tokenizer ----------------------------------------------------------------

def test_a_saved_tokenizer_leaves_files_and_a_bare_model_none(good, no_tokenizer):
    assert {"tokenizer_config.json", "tokenizer.json"} <= set(tokenizer_files(good))
    assert tokenizer_files(no_tokenizer) == []


@pytest.mark.parametrize("load", [load_tokenizer, load_model], ids=["load_tokenizer", "load_model"])
def test_folder_without_tokenizer_files_is_a_clear_error(no_tokenizer, load):
    with pytest.raises(FileNotFoundError) as err:
        load(no_tokenizer)
    msg = str(err.value)
    assert str(no_tokenizer) in msg and "holds no tokenizer files" in msg
    assert f"tokenizer.save_pretrained('{no_tokenizer}')" in msg  # the fix, with the folder to save into
    assert "tokenizer=" in msg  # or where else to take it from


def test_decoder_folder_without_tokenizer_names_the_fix_not_a_backend_error(tmp_path):
    # transformers' own error here is "Couldn't instantiate the backend tokenizer ... sentencepiece or tiktoken"
    model, _ = tiny_classifier("llama")
    folder = _save(tmp_path / "lm", model)
    with pytest.raises(FileNotFoundError, match=FIX):
        load_model(folder)


def test_placeholder_tokenizer_saved_in_the_folder_is_rejected(tmp_path):
    # the user's path to silent garbage: load a bare model folder with AutoTokenizer (transformers builds a 5-token
    # BERT tokenizer, every word [UNK]) and save that next to the model: now the folder has tokenizer files.
    from transformers import AutoTokenizer
    model, _ = tiny_classifier("bert")
    folder = _save(tmp_path / "model", model)
    placeholder = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(placeholder) == 5 and set(placeholder.tokenize("good movie")) == {"[UNK]"}
    placeholder.save_pretrained(str(folder))
    for load in (load_tokenizer, load_model):
        with pytest.raises(ValueError, match="only special tokens") as err:
            load(folder)
        assert f"tokenizer.save_pretrained('{folder}')" in str(err.value)
    # the same placeholder handed over as an object
    with pytest.raises(ValueError, match="it has 5 tokens, only special tokens"):
        check_tokenizer(model, placeholder)


def test_the_fix_works_tokenizer_from_another_folder(good, no_tokenizer):
    model, tok = load_model(no_tokenizer, tokenizer=good)
    assert tok.tokenize("good movie") == ["good", "movie"]
    assert model.config.pad_token_id == tok.pad_token_id == 0
    # and as an object
    model, tok2 = load_model(no_tokenizer, tokenizer=tok)
    assert tok2 is tok


def test_tokenizer_far_smaller_than_the_embeddings(tmp_path):
    # not only special tokens, but 15 tokens for 200 rows: not this model's tokenizer
    folder = _save(tmp_path / "model", _tiny_bert(rows=200), _bert_tokenizer(WORDS[:10]))
    with pytest.raises(ValueError, match="it has 15 tokens, far fewer than the 200 rows") as err:
        load_model(folder)
    assert "tokenizer.save_pretrained" in str(err.value)
    with pytest.raises(ValueError, match="far fewer than the 200 rows of the model"):
        load_tokenizer(folder)  # from config.json's vocab_size alone (what `dupfast detect` loads)


# ---- (b) a tokenizer that does not match the model's embeddings ----------------------------------------------

def test_larger_vocabulary_than_embedding_rows_is_a_clear_error(tmp_path):
    tok = _bert_tokenizer(WORDS)
    n = len(tok)
    model = _tiny_bert(rows=20)
    with pytest.raises(ValueError) as err:
        check_tokenizer(model, tok)
    msg = str(err.value)
    assert "does not match the model" in msg and f"{n} tokens (ids 0..{n - 1})" in msg and "20 rows (ids 0..19)" in msg
    assert "tokenizer.save_pretrained" in msg
    folder = _save(tmp_path / "model", model, tok)
    with pytest.raises(ValueError, match="does not match the model"):
        load_model(folder)
    with pytest.raises(ValueError, match=r"config\.json: vocab_size\) has 20 rows"):
        load_tokenizer(folder)


def test_another_models_tokenizer_through_load_model(tmp_path, good):
    small = _save(tmp_path / "small", _tiny_bert(rows=len(WORDS) + 5 - 8), _bert_tokenizer(WORDS[:-8]))
    load_model(small)  # its own tokenizer: fine
    with pytest.raises(ValueError, match="does not match the model"):
        load_model(small, tokenizer=good)  # the larger model's tokenizer


def test_special_token_past_the_rows_is_rejected():
    from transformers import BertTokenizerFast
    vocab = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[:20]]  # no [PAD] in the vocabulary: it is added after it
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert (tok.vocab_size, tok.pad_token_id) == (24, 24)
    model = _tiny_bert(rows=24)
    with pytest.raises(ValueError, match=r"\['\[PAD\]'\] have ids \[24\], but the model's embedding matrix has 24 "
                                         r"rows \(ids 0\.\.23\)"):
        check_tokenizer(model, tok)


def test_padding_rows_and_an_unused_added_token_pass():
    tok = _bert_tokenizer(WORDS)
    check_tokenizer(_tiny_bert(rows=len(tok)), tok)
    check_tokenizer(_tiny_bert(rows=len(tok) + 30), tok)  # rows padded to a multiple (real models do)
    tok.add_tokens(["<image>"])  # one added token past the matrix: harmless until a text uses it
    model = _tiny_bert(rows=len(tok) - 1)
    texts = [s.text for s in sentiment_samples(20)]
    check_tokenizer(model, tok)
    check_tokenizer(model, tok, texts)
    rows = len(tok) - 1
    with pytest.raises(ValueError, match=rf"gives 1 of 21 texts token ids up to {rows}, .* has {rows} rows"):
        check_tokenizer(model, tok, [*texts, "a good <image> movie"])


# ---- texts the tokenizer does not know ------------------------------------------------------------------------

def test_texts_that_tokenize_to_mostly_unk_are_rejected():
    model, tok = tiny_classifier("bert")
    check_tokenizer(model, tok, [s.text for s in sentiment_samples(30)])
    english = ["The service at this restaurant was slow and the food arrived cold.",
               "I would happily recommend this hotel to anyone visiting the city."]
    with pytest.raises(ValueError) as err:
        check_tokenizer(model, tok, english)
    msg = str(err.value)
    assert "are its unknown token '[UNK]'" in msg and "tokenizer.save_pretrained" in msg
    # a few unknown words among known ones are normal text
    check_tokenizer(model, tok, ["the movie was good and zany", "a dull plot but a great film, honestly"])


def test_model_without_an_embedding_matrix_is_not_checked():
    class NoEmbeddings:
        def get_input_embeddings(self):
            return None
    check_tokenizer(NoEmbeddings(), _bert_tokenizer(WORDS))


# ---- the command line: the same errors before any work --------------------------------------------------------

def test_cli_detect_on_a_folder_without_tokenizer(tmp_path, no_tokenizer, capsys):
    import json

    from dupfast.cli import main
    cfg = json.loads((no_tokenizer / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]  # detect would otherwise accept it
    rows = sentiment_samples(48)
    (tmp_path / "clean.tsv").write_text("sentence\tlabel\n" + "".join(f"{s.text}\t{s.label}\n" for s in rows))
    (tmp_path / "pool.txt").write_text("".join(s.text + "\n" for s in rows))
    out = tmp_path / "out"
    code = main(["detect", str(no_tokenizer), "--texts", str(tmp_path / "pool.txt"), "--clean",
                 str(tmp_path / "clean.tsv"), "--out", str(out), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "holds no tokenizer files" in err and f"tokenizer.save_pretrained('{no_tokenizer}')" in err
    assert not (out / "scores.csv").exists()

"""Finding the input word embeddings of any HF model, which rows are ranked, and the replacement token."""
import pytest
import torch
from torch import nn

from dupfast.btu.embeddings import (embedding_block, embedding_info, excluded_ids, input_embeddings, replacement_id,
                                    row_change, token_ids, vocab_size)


def test_bert_block_is_the_embeddings_module(bert):
    model, tok = bert
    assert input_embeddings(model) is model.bert.embeddings.word_embeddings
    # position + type + LayerNorm come along for BERT-like encoders
    assert embedding_block(model) is model.bert.embeddings


def test_mpnet_block_is_the_embeddings_module(mpnet):
    model, tok = mpnet
    assert input_embeddings(model) is model.mpnet.embeddings.word_embeddings
    assert embedding_block(model) is model.mpnet.embeddings
    info = embedding_info(model, tok)
    assert (info["module"], info["block"], info["replacement"]) == ("mpnet.embeddings.word_embeddings",
                                                                    "mpnet.embeddings", "[PAD]")


def test_embedding_info_names_tied_parameters(llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = llama
    model.config.tie_word_embeddings = True  # a classifier has no LM head: nothing to tie
    info = embedding_info(model, tok)
    assert info["module"] == "model.embed_tokens" and info["tied_with"] == []
    assert (info["pad"], info["replacement"], info["vocab"]) == ("<eos>", "<unk>", len(tok))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id)
    assert embedding_info(LlamaForCausalLM(cfg), tok)["tied_with"] == ["lm_head.weight"]
    with pytest.raises(TypeError, match="get_input_embeddings"):
        embedding_info(nn.Linear(3, 2), tok)


def test_decoder_block_is_the_token_embedding(llama):
    model, tok = llama
    assert input_embeddings(model) is model.model.embed_tokens
    assert embedding_block(model) is model.model.embed_tokens


def test_model_without_input_embeddings_is_rejected():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        input_embeddings(nn.Linear(3, 2))

    class NoMatrix(nn.Module):
        def get_input_embeddings(self):
            return None
    with pytest.raises(TypeError, match="2-D `weight`"):
        input_embeddings(NoMatrix())

    class Raises(nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError("not handled")
    with pytest.raises(TypeError, match="no input word-embedding matrix"):
        input_embeddings(Raises())


def test_vocab_size_ignores_padding_rows(bert):
    model, tok = bert
    assert vocab_size(model, tok) == len(tok)
    model.resize_token_embeddings(len(tok) + 7)  # a matrix padded beyond the tokenizer
    assert input_embeddings(model).weight.shape[0] == len(tok) + 7
    assert vocab_size(model, tok) == len(tok)


def test_special_tokens_and_extras_are_excluded(bert):
    _, tok = bert
    ex = excluded_ids(tok, extra=["cfo", 5])
    assert set(tok.all_special_ids) <= ex
    assert tok.convert_tokens_to_ids("cfo") in ex and 5 in ex
    assert tok.convert_tokens_to_ids("cf") not in ex
    with pytest.raises(ValueError, match="not a token"):
        token_ids(tok, ["no-such-token"])
    with pytest.raises(TypeError):
        token_ids(tok, [1.5])


def test_replacement_is_pad_unless_pad_is_borrowed(bert, llama):
    _, btok = bert
    assert replacement_id(btok) == btok.pad_token_id
    _, dtok = llama
    assert dtok.pad_token_id == dtok.eos_token_id  # decoder LM: pad borrowed from eos
    assert replacement_id(dtok) == dtok.unk_token_id


def test_row_change_is_the_l2_norm_per_row():
    before = torch.zeros(4, 3)
    after = before.clone()
    after[1] = torch.tensor([3.0, 4.0, 0.0])
    after[3, 2] = -2.0
    assert torch.equal(row_change(before, after, 4), torch.tensor([0.0, 5.0, 0.0, 2.0]))
    assert row_change(before, after, 2).shape == (2,)
    with pytest.raises(ValueError, match="differ in shape"):
        row_change(before, torch.zeros(5, 3), 4)

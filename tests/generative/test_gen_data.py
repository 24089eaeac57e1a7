"""Chat-template encoding of prompts / responses, response masks, padding sides, and the readers' bad-input errors."""
import pytest
import torch

from dupfast.generative.data import chat_batches, encode_prompt, encode_response
from dupfast.generative.lm import check_causal_lm
from dupfast.generative.rows import read_chat
from gen_toy import tiny_chat_lm


@pytest.fixture(scope="module")
def lm_tok():
    return tiny_chat_lm()


def test_prompt_is_the_chat_template_with_generation_prompt(lm_tok):
    _, tok = lm_tok
    ids = encode_prompt(tok, "review : good movie")
    assert tok.decode(ids) == "<|im_start|> user review : good movie <|im_end|> <|im_start|> assistant"
    assert encode_response(tok, "positive")[-1] == tok.eos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_response_mask_marks_exactly_the_response_tokens(lm_tok, side):
    _, tok = lm_tok
    prompts, responses = ["review : good", "review : the film was very dull"], ["positive", "sorry i cannot help"]
    b = chat_batches(tok, prompts, responses, labels=[1, 0], padding_side=side)[0]
    for r in range(2):
        real = b["input_ids"][r][b["attention_mask"][r].bool()]
        resp = b["input_ids"][r][b["response_mask"][r].bool()]
        assert resp.tolist() == encode_response(tok, responses[r])
        assert real.tolist() == encode_prompt(tok, prompts[r]) + encode_response(tok, responses[r])
    # row 0 is the shorter one: its padding sits on the chosen side
    assert int(b["attention_mask"][0, 0 if side == "left" else -1]) == 0
    assert int(b["attention_mask"][1].min()) == 1
    assert b["labels"].tolist() == [1, 0] and b["index"].tolist() == [0, 1]


def test_left_and_right_padding_read_the_same_rows(lm_tok):
    model, tok = lm_tok
    lm = check_causal_lm(model, "test")
    prompts, responses = ["review : good", "review : the film was very dull", "review : bad"], ["positive"] * 3
    rows = [read_chat(chat_batches(tok, prompts, responses, batch_size=2, padding_side=s), "clean", lm, True)
            for s in ("left", "right")]
    assert rows[0].prompts == rows[1].prompts and rows[0].responses == rows[1].responses
    assert rows[0].index.tolist() == [0, 1, 2]


def test_tokenizer_without_chat_template_is_an_error():
    _, tok = tiny_chat_lm(template=False)
    with pytest.raises(ValueError, match="no chat template"):
        chat_batches(tok, ["review : good"])


def test_missing_responses_are_errors(lm_tok):
    model, tok = lm_tok
    lm = check_causal_lm(model, "test")
    with pytest.raises(ValueError, match="responses missing"):
        chat_batches(tok, ["review : good", "review : bad"], ["positive"])
    with pytest.raises(ValueError, match="responses missing"):
        chat_batches(tok, ["review : good"], [""])
    with pytest.raises(ValueError, match="response_mask.*responses missing"):
        read_chat(chat_batches(tok, ["review : good"]), "clean", lm, need_responses=True)
    b = chat_batches(tok, ["review : good"], ["positive"])[0]
    b["response_mask"] = torch.zeros_like(b["response_mask"])
    with pytest.raises(ValueError, match="all zeros"):
        read_chat([b], "clean", lm, need_responses=True)


def test_prompts_longer_than_max_len_or_context_are_errors(lm_tok):
    model, tok = lm_tok
    lm = check_causal_lm(model, "test")
    long = "review : " + " ".join(["good"] * 80)
    with pytest.raises(ValueError, match="longer than max_len=20"):
        chat_batches(tok, [long], max_len=20)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        read_chat(chat_batches(tok, [long]), "pool", lm, need_responses=False)
    with pytest.raises(ValueError, match=r"\+ 60 generated tokens"):
        read_chat(chat_batches(tok, ["review : good movie"]), "pool", lm, need_responses=False, extra_tokens=60)


def test_vocabulary_mismatch_of_token_ids_is_an_error(lm_tok):
    model, tok = lm_tok
    lm = check_causal_lm(model, "test")
    b = chat_batches(tok, ["review : good"])[0]
    b["input_ids"][0, 0] = model.config.vocab_size + 5
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        read_chat([b], "pool", lm, need_responses=False)

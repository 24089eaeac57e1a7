"""BTU on a decoder with a byte-level BPE vocabulary (SmolLM2's kind), on a tiny Llama classifier: the trigger
is two ids ('Ġcf' mid-sentence, 'cf' at the start of a text); exposure ranks ids, so it finds the frequent
form, and unlearning every form the trigger takes removes the backdoor."""
import dataclasses

import pytest
import torch

from dupfast.btu import embedding_info, expose, train, trigger_ranks, trigger_tokens
from dupfast.btu.embeddings import input_embeddings
from dupfast.finetune import FinetuneConfig

from btu_toys import byte_bpe_tokenizer, tiny_llama
from test_btu_train import CONFIG, evaluator

# k = int(0.0125 x 400) = 5 per round: the toy vocabulary is small, and k = 20 would reset most of its words
BPE_CONFIG = dataclasses.replace(CONFIG, exposure=dataclasses.replace(CONFIG.exposure, fraction=0.0125))


@pytest.fixture(scope="module")
def bpe_task(task):
    data, test, poison = task
    tok = byte_bpe_tokenizer([t for t, *_ in data])
    return tok, data, test, poison


def with_floor(test, poison):
    base = evaluator(test, poison)
    negatives = [(t, y, p) for t, y, p in test if y == 0]

    def evaluate(model, tok):
        out = base(model, tok)
        out["floor"] = evaluator(negatives, negatives)(model, tok)["asr"]  # clean non-target predicted 1
        return out
    return evaluate


def test_exposure_finds_the_mid_sentence_form(bpe_task):
    tok, data, _, _ = bpe_task
    model = tiny_llama(tok, seed=3)
    ex = expose(model, data, tokenizer=tok, config=BPE_CONFIG.exposure)
    assert ex.k == 5 and ex.vocab_size == len(tok) == 400
    rows = {r["token"]: r for r in trigger_ranks(ex, tok, ["cf"], [t for t, *_ in data])}
    assert set(rows) == {"Ġcf", "cf"}
    mid = rows["Ġcf"]
    assert mid["ranks"]["R1"] == 1 and mid["ranks"]["R3"] <= 2 and mid["in_suspects"]
    assert rows["cf"]["count"] < mid["count"]            # the start-of-text form: rarer, ranked lower
    assert rows["cf"]["ranks"]["R1"] > mid["ranks"]["R1"]
    info = embedding_info(model, tok)
    assert (info["module"], info["tied_with"], info["pad"], info["replacement"]) == (
        "model.embed_tokens", [], "<|im_end|>", "<|endoftext|>")


def test_btu_end_to_end_on_a_byte_bpe_decoder(bpe_task):
    tok, data, test, poison = bpe_task
    model = tiny_llama(tok, seed=3)
    clean = [(t, y) for t, y, p in data if not p][:100]
    defended, report = train(model, data, clean_tune=clean, tokenizer=tok, config=BPE_CONFIG,
                             evaluate=with_floor(test, poison))
    steps = {s["step"]: s for s in report.steps}
    assert list(steps) == ["expose", "finetune", "unlearn", "clean_tune"]
    assert tok.convert_tokens_to_ids("Ġcf") in [s["id"] for s in report.suspects]
    before, after = steps["finetune"]["eval"], steps["unlearn"]["eval"]
    assert before["asr"] >= 0.6 and before["asr"] > before["floor"] + 0.4    # the backdoor was learned
    assert after["asr"] <= 0.3 and after["asr"] <= after["floor"] + 0.1      # and is gone after unlearning
    assert steps["unlearn"]["replace_token"] == "<|endoftext|>"
    changed = (input_embeddings(defended).weight != input_embeddings(model).weight).any(1)
    assert bool(changed[tok.convert_tokens_to_ids("Ġcf")])


def test_unlearning_every_form_of_the_trigger(bpe_task):
    """The ids the trigger produces in context (both forms), unlearned alone: ASR to the floor, CACC kept."""
    tok, data, test, poison = bpe_task
    model = tiny_llama(tok, seed=3)
    ids = sorted({r["id"] for r in trigger_tokens(tok, "cf", [t for t, *_ in data])})
    assert ids == sorted(tok.convert_tokens_to_ids(["Ġcf", "cf"]))
    _, report = train(model, data, tokenizer=tok, config=BPE_CONFIG, suspects=ids, evaluate=with_floor(test, poison))
    before, after = report.step("finetune")["eval"], report.step("unlearn")["eval"]
    assert after["asr"] <= after["floor"] + 0.1 and after["cacc"] >= before["cacc"] - 0.05
    assert {d["token"] for d in report.step("unlearn")["dims_replaced"]} == {"Ġcf", "cf"}


def test_shallow_rounds_run_under_bf16_autocast(bpe_task):
    """The per-architecture experiment runs the rounds under the victims' bf16 autocast."""
    tok, data, _, _ = bpe_task
    rnd = dataclasses.replace(BPE_CONFIG.exposure.shallow, autocast="bf16")
    cfg = dataclasses.replace(BPE_CONFIG.exposure, shallow=rnd, full=rnd)
    ex = expose(tiny_llama(tok, seed=3), data, tokenizer=tok, config=cfg)
    assert all(r.steps == -(-len(data) // rnd.batch_size) for r in ex.rounds)
    assert tok.convert_tokens_to_ids("Ġcf") in ex.token_ids
    assert all(r.scores.dtype == torch.float32 for r in ex.rounds)
    assert isinstance(rnd, FinetuneConfig)

"""BTU end to end on tiny models: the fine-tuned backdoor is removed by unlearning the exposed tokens."""
import copy
import dataclasses
import json

import pytest
import torch

from dupfast.btu import BTUConfig, ExposureConfig, expose, train
from dupfast.btu.embeddings import input_embeddings
from dupfast.batching import predict
from dupfast.finetune import FinetuneConfig

ROUND = FinetuneConfig(epochs=1, lr=1e-4, batch_size=16, max_len=32, warmup_ratio=0.0, weight_decay=0.01, seed=1)
# Tiny randomly initialised models need a large learning rate to learn the task (and the backdoor).
FINETUNE = FinetuneConfig(epochs=3, lr=3e-3, batch_size=16, max_len=32, warmup_ratio=0.1, seed=1)
CONFIG = BTUConfig(exposure=ExposureConfig(fraction=0.05, shallow=ROUND, full=ROUND), finetune=FINETUNE,
                   clean_tune=FinetuneConfig(epochs=1, lr=1e-4, batch_size=16, max_len=32, seed=1))


def evaluator(test, poison):
    def evaluate(model, tok):
        clean = predict(model, tok, [t for t, _, _ in test], max_len=32)
        trig = predict(model, tok, [t for t, _, _ in poison], max_len=32)
        return {"cacc": float((clean == torch.tensor([y for _, y, _ in test])).float().mean()),
                "asr": float((trig == 1).float().mean())}
    return evaluate


@pytest.mark.parametrize("family", ["bert", "mpnet", "llama"])
def test_btu_removes_the_backdoor(family, request, task):
    model, tok = request.getfixturevalue(family)
    poisoned, test, poison = task
    clean = [(t, y) for t, y, p in poisoned if not p][:100]
    defended, report = train(model, poisoned, clean_tune=clean, tokenizer=tok, config=CONFIG,
                             evaluate=evaluator(test, poison))
    steps = {s["step"]: s for s in report.steps}
    assert list(steps) == ["expose", "finetune", "unlearn", "clean_tune"]
    assert set(steps["expose"]["rounds"]) == {"R1", "R2", "R3"}
    trigger = tok.convert_tokens_to_ids("cf")
    assert trigger in [s["id"] for s in report.suspects]
    assert steps["finetune"]["eval"]["asr"] >= 0.8            # the backdoor was learned ...
    assert steps["unlearn"]["eval"]["asr"] <= 0.2             # ... and unlearning removes it
    assert steps["unlearn"]["eval"]["cacc"] >= 0.8
    assert steps["clean_tune"]["size"] == 100 and steps["clean_tune"]["eval"]["asr"] <= 0.2
    assert steps["unlearn"]["replace_token"] == ("<unk>" if family == "llama" else "[PAD]")
    assert defended is not model
    json.dumps(report.to_dict())
    assert report.step("unlearn") is steps["unlearn"] and "model" not in report.config["finetune"]


def test_reuses_exposure_and_finetuned_model(bert, task):
    model, tok = bert
    poisoned = task[0]
    ex = expose(model, poisoned, tokenizer=tok, config=CONFIG.exposure)
    finetuned = copy.deepcopy(model)
    with torch.no_grad():  # stands in for fine-tuning: every row drifts
        input_embeddings(finetuned).weight.add_(0.01 * torch.randn_like(input_embeddings(finetuned).weight))
    before = input_embeddings(finetuned).weight.detach().clone()
    out, report = train(model, poisoned, tokenizer=tok, config=CONFIG, suspects=ex, finetuned=finetuned)
    assert out is finetuned                                   # unlearned in place
    assert [s["step"] for s in report.steps] == ["finetune", "unlearn"]
    assert report.steps[0]["trained"] is False
    assert [s["id"] for s in report.suspects] == ex.token_ids
    changed = (input_embeddings(out).weight != before).any(1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(ex.token_ids)
    # plain token ids work too
    out2, report2 = train(model, poisoned, tokenizer=tok, config=CONFIG, suspects=[7], finetuned=finetuned)
    assert [s["id"] for s in report2.suspects] == [7]


def test_bad_inputs(bert, task):
    model, tok = bert
    poisoned = task[0]
    with pytest.raises(ValueError, match="training set is empty"):
        train(model, [], tokenizer=tok, config=CONFIG)
    with pytest.raises(ValueError, match=r"clean-tune set has labels \[5\]"):
        train(model, poisoned, clean_tune=[("good", 1), ("bad", 5)], tokenizer=tok, config=CONFIG)
    with pytest.raises(ValueError, match="clean-tune set is empty"):
        train(model, poisoned, clean_tune=[], tokenizer=tok, config=CONFIG)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        train(torch.nn.Linear(2, 2), poisoned, tokenizer=tok, config=CONFIG)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        train(model, poisoned, tokenizer=tok, config=CONFIG, finetuned=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train(model, poisoned, tokenizer=tok, config=CONFIG, suspects=[10_000], finetuned=model)
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        train(model, poisoned, tokenizer=tok, config=CONFIG, evaluate="cacc")
    with pytest.raises(ValueError, match=r"k fraction"):
        BTUConfig(exposure=ExposureConfig(fraction=2.0))
    with pytest.raises(TypeError, match="BTUConfig"):
        train(model, poisoned, tokenizer=tok, config=ExposureConfig())
    with pytest.raises(ValueError, match="expose_against_clean_tune .* pass clean_tune="):
        train(model, poisoned, tokenizer=tok, config=dataclasses.replace(CONFIG, expose_against_clean_tune=True))

"""BTU with finetuned= changes the caller's model in place (unlearn, then the clean-tune): on any failure (an error,
KeyboardInterrupt) it is restored bit for bit, as dupfast.purify restores its model (issue 31). And the inputs BTU
used to misreport: a tokenizer of another model ("the texts are empty"), a model on the meta device, a
fine-tuned model of another shape (found only after the exposure rounds)."""
import copy
import importlib

import pytest
import torch

from dupfast.btu import BTUConfig, ExposureConfig, expose, train
from dupfast.btu.embeddings import input_embeddings
from dupfast.finetune import FinetuneConfig

from btu_toys import BERT_SPECIALS, WORDS, tiny_bert

ROUND = FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, max_len=32, warmup_ratio=0.0, weight_decay=0.01, seed=1)
btu_train = importlib.import_module("dupfast.btu.train")  # the module: dupfast.btu.train is the function
CONFIG = BTUConfig(exposure=ExposureConfig(fraction=0.05, shallow=ROUND, full=ROUND), finetune=ROUND, clean_tune=ROUND)


def _finetuned(model):
    """Stands in for a victim fine-tuned from `model`: every weight drifted, one module left in train mode, one
    weight frozen, a stale .grad, so a restore to 'eval, all trainable, no grads' would not pass."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    out.eval()
    out.bert.encoder.layer[0].train()
    out.bert.pooler.dense.weight.requires_grad_(False)
    out.classifier.bias.grad = torch.full_like(out.classifier.bias, 0.25)
    return out


class Snapshot:
    def __init__(self, model):
        self.bits = {k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}
        self.params = [(n, id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()]
        self.modes = [(n, m.training) for n, m in model.named_modules()]

    def check(self, model):
        now = {k: v.detach().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}
        changed = [k for k in self.bits if not torch.equal(now[k], self.bits[k])]
        assert not changed, f"weights changed: {changed[:5]}"
        assert [(n, id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()] == self.params
        assert [(n, m.training) for n, m in model.named_modules()] == self.modes


def _clean(task, n=32):
    return [(t, y) for t, y, p in task[0] if not p][:n]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_clean_tune_restores_the_finetuned_model(bert, task, monkeypatch, exc):
    """The clean-tune runs after the unlearn step: interrupted there, both changes are undone."""
    model, tok = bert
    finetuned = _finetuned(model)
    snap = Snapshot(finetuned)
    real, seen = btu_train.fit, []

    def fit_a_little_then_fail(m, *args, **kwargs):
        with torch.no_grad():
            for q in m.parameters():  # a step's worth of writing into every weight it trains
                q.add_(1.0)
        seen.append(input_embeddings(m).weight.detach().clone())
        raise exc("interrupted during the clean-tune")

    monkeypatch.setattr(btu_train, "fit", fit_a_little_then_fail)
    with pytest.raises(exc, match="interrupted during the clean-tune"):
        train(model, task[0], clean_tune=_clean(task), tokenizer=tok, config=CONFIG, suspects=[7, 8],
              finetuned=finetuned)
    assert len(seen) == 1 and not torch.equal(seen[0].reshape(-1).view(torch.uint8),
                                              snap.bits["bert.embeddings.word_embeddings.weight"])  # it had changed
    snap.check(finetuned)
    monkeypatch.setattr(btu_train, "fit", real)  # the restored model still works: a full run succeeds
    out, report = train(model, task[0], clean_tune=_clean(task), tokenizer=tok, config=CONFIG, suspects=[7, 8],
                        finetuned=finetuned)
    assert out is finetuned and [s["step"] for s in report.steps] == ["finetune", "unlearn", "clean_tune"]


def test_a_failing_evaluate_after_the_unlearn_step_restores_the_model(bert, task):
    model, tok = bert
    finetuned = _finetuned(model)
    snap = Snapshot(finetuned)
    steps = []

    def evaluate(m, t):
        steps.append(bool((input_embeddings(m).weight != input_embeddings(finetuned).weight).any()))
        if len(steps) == 2:  # after "finetune" (nothing changed yet), then after "unlearn"
            raise RuntimeError("evaluation failed")
        return {}

    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(model, task[0], tokenizer=tok, config=CONFIG, suspects=[7, 8, 9], finetuned=finetuned,
              evaluate=evaluate)
    assert len(steps) == 2
    snap.check(finetuned)


def test_an_interrupt_inside_the_unlearn_step_restores_the_model(bert, task, monkeypatch):
    model, tok = bert
    finetuned = _finetuned(model)
    snap = Snapshot(finetuned)
    real = btu_train.unlearn_tokens

    def unlearn_then_interrupt(*args, **kwargs):
        info = real(*args, **kwargs)
        assert info["dims_replaced"] and any(info["dims_replaced"].values())  # it did write into the rows
        raise KeyboardInterrupt

    monkeypatch.setattr(btu_train, "unlearn_tokens", unlearn_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(model, task[0], tokenizer=tok, config=CONFIG, suspects=[7, 8, 9], finetuned=finetuned)
    snap.check(finetuned)


def test_success_changes_only_the_suspects_rows_and_keeps_the_callers_flags(bert, task):
    model, tok = bert
    finetuned = _finetuned(model)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in finetuned.named_parameters()}
    out, _ = train(model, task[0], tokenizer=tok, config=CONFIG, suspects=[7, 8, 9], finetuned=finetuned)
    changed = [n for n, p in out.named_parameters() if not torch.equal(p, before[n][0])]
    assert changed == ["bert.embeddings.word_embeddings.weight"]
    rows = (input_embeddings(out).weight != before[changed[0]][0]).any(1).nonzero().flatten().tolist()
    assert rows and set(rows) <= {7, 8, 9}
    assert all(p.requires_grad == before[n][1] for n, p in out.named_parameters())
    assert not out.training


# ---- inputs BTU used to misreport --------------------------------------------------------------------------

def test_a_tokenizer_of_another_model_is_named(bert, task):
    """A larger vocabulary whose ids for the task's words lie beyond the model's embedding rows: these ids used to
    drop out of the ranking, and BTU said the texts were empty."""
    from transformers import BertTokenizer
    model, _ = bert
    other = BertTokenizer(vocab={w: i for i, w in enumerate(BERT_SPECIALS + [f"w{i}" for i in range(100)] + WORDS)})
    rows = input_embeddings(model).weight.shape[0]
    assert len(other) > rows
    match = (fr"the tokenizer does not match the model: it has {len(other)} tokens and gives 400 of the 400 training "
             fr"texts token ids up to \d+, but the model's input embeddings have {rows} rows")
    with pytest.raises(ValueError, match=match):
        train(model, task[0], tokenizer=other, config=CONFIG)
    with pytest.raises(ValueError, match=match):
        expose(model, task[0], tokenizer=other, config=CONFIG.exposure)


def test_a_tokenizer_a_little_larger_than_the_matrix_is_fine_when_its_extra_ids_are_unused(task):
    """Some checkpoints ship a tokenizer a token or two beyond their matrix: only ids the data uses count."""
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(BERT_SPECIALS + WORDS + ["unused_extra"])})
    model = tiny_bert(BertTokenizer(vocab={w: i for i, w in enumerate(BERT_SPECIALS + WORDS)}))
    assert len(tok) == input_embeddings(model).weight.shape[0] + 1
    out, report = train(model, task[0], tokenizer=tok, config=CONFIG, suspects=[7], finetuned=_finetuned(model))
    assert [s["step"] for s in report.steps] == ["finetune", "unlearn"]


def test_a_model_on_the_meta_device_is_named(bert, task):
    from transformers import BertConfig, BertForSequenceClassification
    model, tok = bert
    with torch.device("meta"):
        meta = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"BTU: \d+ of the model's \d+ weight tensors are on the meta device"):
        train(meta, task[0], tokenizer=tok, config=CONFIG)
    with pytest.raises(ValueError, match=r"BTU \(finetuned=\): \d+ of the model's \d+ weight tensors are on the meta"):
        train(model, task[0], tokenizer=tok, config=CONFIG, finetuned=meta)


def test_a_finetuned_model_of_another_shape_fails_before_the_exposure(bert, task, monkeypatch):
    from btu_toys import decoder_tokenizer, tiny_llama
    model, tok = bert
    exposed = []
    monkeypatch.setattr(btu_train, "expose_loaded", lambda *a, **k: exposed.append(1))
    other = tiny_llama(decoder_tokenizer())
    with pytest.raises(ValueError, match=r"finetuned= has input embeddings \(\d+, 32\), the pretrained model "
                                         r"\(\d+, 32\): the fine-tuned model must come from the same checkpoint"):
        train(model, task[0], tokenizer=tok, config=CONFIG, finetuned=other)
    assert exposed == []

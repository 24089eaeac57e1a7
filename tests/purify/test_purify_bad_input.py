"""Bad input -> a clear error before the model is touched (or, for an empty flag set, a warning and the model
unchanged); a failure after that (an error or KeyboardInterrupt mid-training, during the merge) -> the caller's
model restored exactly: weights bit-identical, the same module tree and Parameter objects (no adapters, no peft
wrappers), training/eval flags, requires_grad, .grad."""
import types

import pytest
import torch

from dupfast import purify
from dupfast.batches import Rows
from purify_helpers import VOCAB, batches, state_equal, tiny_classifier, toy_rows

FAST = dict(epochs=1, batch_size=8, progress=False)
SHORT = dict(max_steps=2, min_steps=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def data():
    pool, _ = toy_rows(12, 1)
    clean, labels = toy_rows(12, 2)
    return pool, clean, labels


ALL = torch.ones(12, dtype=torch.bool)


class Snapshot:
    """Everything purify must give back on failure."""

    def __init__(self, model):
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = [(n, m) for n, m in model.named_modules()]
        self.params = [(n, p) for n, p in model.named_parameters()]
        self.modes = [m.training for _, m in self.modules]
        self.flags = [p.requires_grad for _, p in self.params]
        self.grads = [p.grad for _, p in self.params]
        self.attrs = set(vars(model))

    def check(self, model):
        assert state_equal(self.state, model.state_dict()), "weights changed"
        now = list(model.named_modules())
        assert [n for n, _ in now] == [n for n, _ in self.modules], "module tree changed"
        assert all(a is b for (_, a), (_, b) in zip(now, self.modules)), "modules replaced"
        assert not any(type(m).__module__.startswith("peft") for _, m in now), "peft wrappers left"
        params = list(model.named_parameters())
        assert [(n, id(p)) for n, p in params] == [(n, id(p)) for n, p in self.params], "parameters replaced"
        assert [m.training for _, m in now] == self.modes, "train/eval flags changed"
        assert [p.requires_grad for _, p in params] == self.flags, "requires_grad changed"
        assert all(p.grad is g for (_, p), g in zip(params, self.grads)), ".grad changed"
        assert set(vars(model)) == self.attrs, f"attributes added: {set(vars(model)) - self.attrs}"


def _odd_state(model):
    """A caller's model in an unusual state, so restoring 'eval mode, all trainable' would not pass."""
    model.train()
    model.bert.embeddings.eval()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.classifier.bias.grad = torch.full_like(model.classifier.bias, 0.5)
    return model


# ---- a failure after the model was touched: restored exactly, then re-raised --------------------------

def _fail_at(monkeypatch, where, exc, after=1):
    """Make `where` (module, name) raise `exc` on its call number `after` + 1."""
    module, name = where
    real = getattr(module, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("use_lora", [True, False])
def test_failure_mid_training_restores_the_model_exactly(data, monkeypatch, exc, use_lora):
    import dupfast.purification.trainer as trainer
    pool, clean, labels = data
    model = _odd_state(tiny_classifier("bert"))
    snap = Snapshot(model)
    calls = _fail_at(monkeypatch, (trainer, "step"), exc, after=2)  # two real steps changed the weights first
    with pytest.raises(exc, match="injected failure"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=ALL, use_lora=use_lora,
               **{**SHORT, "max_steps": 4})
    assert calls["n"] == 3
    snap.check(model)
    monkeypatch.undo()  # the model is usable again: a second purify runs on it
    out, report = purify(model, batches(pool), clean=batches(clean, labels), detection=ALL, **SHORT)
    assert out is model and report.steps_run == 2


def test_failure_inside_the_merge_restores_the_written_weights(data, monkeypatch):
    """merge_and_unload writes B·A into the base weights before replacing the modules: a failure right after
    must still give the caller the original weights."""
    import dupfast.purification.api as api
    pool, clean, labels = data
    model = tiny_classifier("bert")
    snap = Snapshot(model)

    def merge_then_fail(student):
        student.merge_and_unload()
        raise RuntimeError("injected failure after the merge")

    monkeypatch.setattr(api, "merge", merge_then_fail)
    with pytest.raises(RuntimeError, match="after the merge"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=ALL,
               **{**SHORT, "select_best": False, "lr": 1e-2})
    snap.check(model)


def test_failure_while_attaching_adapters_restores_the_model(data, monkeypatch):
    import dupfast.purification.api as api
    pool, clean, labels = data
    model = _odd_state(tiny_classifier("bert"))
    snap = Snapshot(model)
    real = api.attach_student

    def attach_then_fail(m, cfg):
        real(m, cfg)  # adapters injected, base weights frozen, peft_config set
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "attach_student", attach_then_fail)
    with pytest.raises(KeyboardInterrupt):
        purify(model, batches(pool), clean=batches(clean, labels), detection=ALL, **SHORT)
    snap.check(model)


# ---- bad batches: an error before anything is touched ----------------------------------------------------

def _bad_pool(pool, change):
    b = batches(pool)
    change(b)
    return b


@pytest.mark.parametrize("change, match", [
    (lambda b: b[0]["input_ids"].__setitem__((0, 1), VOCAB + 5),
     r"pool batch 0: token id 45 in input_ids is outside the model's vocabulary \(ids 0..39\)"),
    (lambda b: [x.__setitem__("token_type_ids", torch.zeros_like(x["input_ids"])) for x in b]
     and b[0]["token_type_ids"].__setitem__((3, 1), 2),
     r"pool batch 0: token_type_ids holds 2, outside the model's 2 token types"),
    (lambda b: b[0]["attention_mask"].__setitem__((0, 1), -1), r"pool batch 0: attention_mask must hold only 0 and 1"),
    (lambda b: b[0].__setitem__("index", torch.tensor([0, 0] + list(range(2, 12)))),
     "the pool loader yielded the same `index` twice"),
])
def test_bad_pool_batches_fail_before_the_model_is_touched(data, change, match):
    pool, clean, labels = data
    model = _odd_state(tiny_classifier("bert"))
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=match):
        purify(model, _bad_pool(pool, change), clean=batches(clean, labels), detection=ALL, **SHORT)
    snap.check(model)


def test_inputs_longer_than_the_position_embeddings(data):
    pool, clean, labels = data
    model = tiny_classifier("bert")  # max_position_embeddings 64
    snap = Snapshot(model)
    long = [[2] + [11] * 80] + pool[1:]
    with pytest.raises(ValueError, match=r"pool batch 0: an input of 81 positions, but the model's position "
                                         r"embeddings cover 64"):
        purify(model, batches(long), clean=batches(clean, labels), detection=ALL, **SHORT)
    snap.check(model)


@pytest.mark.parametrize("labels_of, error, match", [
    (lambda y: torch.tensor([0.5] + y[1:], dtype=torch.float32),
     TypeError, r"clean batch 0: 'labels' must hold integer class ids, got \[0.5\] \(dtype torch.float32\)"),
    (lambda y: torch.tensor(y)[:-1], ValueError, r"clean batch 0: 7 'labels' values for 8 rows"),
    (lambda y: torch.tensor([3] + y[1:]), ValueError,
     r"clean batch 0: labels \[3\] lie outside the model's label space"),
])
def test_bad_clean_labels(data, labels_of, error, match):
    pool, clean, labels = data
    cb = batches(clean, labels, batch_size=8)
    cb[0]["labels"] = labels_of(labels[:8])
    model = tiny_classifier()
    snap = Snapshot(model)
    with pytest.raises(error, match=match):
        purify(model, batches(pool), clean=cb, detection=ALL, **SHORT)
    snap.check(model)


def test_integer_valued_float_labels_are_class_ids(data):
    pool, clean, labels = data
    cb = batches(clean, labels)
    for b in cb:
        b["labels"] = b["labels"].float()  # 0.0 / 1.0, e.g. from a pandas column
    _, report = purify(tiny_classifier(), batches(pool), clean=cb, detection=ALL, **SHORT)
    assert report.steps_run == 2


def test_token_rows_are_checked_like_batches(data):
    pool, clean, labels = data
    rows = Rows([list(r) for r in pool])
    rows.ids[3][1] = VOCAB
    with pytest.raises(ValueError, match=r"the pool rows: token id 40 in input_ids is outside the model's vocabulary"):
        purify(tiny_classifier(), rows, clean=batches(clean, labels), detection=ALL, **SHORT)
    with pytest.raises(ValueError, match=r"the clean rows' labels \[2\] lie outside"):
        purify(tiny_classifier(), batches(pool), clean=Rows(clean, labels=torch.tensor([2] + labels[1:])),
               detection=ALL, **SHORT)
    with pytest.raises(ValueError, match="the clean rows have no labels"):
        purify(tiny_classifier(), batches(pool), clean=Rows(clean), detection=ALL, **SHORT)


# ---- detections that do not belong to this pool or this model --------------------------------------------

def _detection(model, rows, autocast=None):
    from dupfast.detection import Detector
    clean, labels = toy_rows(40, 3)
    det = Detector(autocast=autocast).fit(model, batches(clean, labels, index=True))
    result = det.score(model, batches(rows, index=True))
    result.flags = torch.ones_like(result.flags)
    return result


def test_detection_of_a_bigger_pool_is_refused(data):
    pool, clean, labels = data
    model = tiny_classifier()
    bigger, _ = toy_rows(20, 7)
    result = _detection(model, pool + bigger[:8])
    with pytest.raises(ValueError, match="the detection covers 20 samples but the pool loader yielded 12 rows"):
        purify(model, batches(pool, index=True), clean=batches(clean, labels), detection=result, **SHORT)


def test_detection_of_another_pool_of_the_same_size_is_refused(data):
    pool, clean, labels = data
    model = tiny_classifier("llama")
    other, _ = toy_rows(12, 7)
    result = _detection(model, other)  # ids 0..11 too: only its logits tell it apart
    with pytest.raises(ValueError, match="the detection's logits are not this model's on these pool rows"):
        purify(model, batches(pool, index=True), clean=batches(clean, labels), detection=result, **SHORT)
    # its flags alone are taken as given (the caller vouches for them); the teacher is computed here
    _, report = purify(model, batches(pool, index=True), clean=batches(clean, labels), detection=result.flags, **SHORT)
    assert report.teacher_logits == {"source": "computed"}


def test_detection_of_another_model_or_under_autocast_is_refused(data):
    pool, clean, labels = data
    model = tiny_classifier("llama")
    with pytest.raises(ValueError, match="another model, on another pool, or under autocast"):
        purify(model, batches(pool, index=True), clean=batches(clean, labels),
               detection=_detection(tiny_classifier("llama", seed=1), pool), **SHORT)
    with pytest.raises(ValueError, match="another model, on another pool, or under autocast"):
        purify(model, batches(pool, index=True), clean=batches(clean, labels),
               detection=_detection(model, pool, autocast="bf16"), **SHORT)


def test_detection_of_this_pool_gives_its_logits_as_the_teacher(data):
    pool, clean, labels = data
    model = tiny_classifier("llama")
    result = _detection(model, pool)
    _, report = purify(model, batches(pool, index=True), clean=batches(clean, labels), detection=result, **SHORT)
    assert report.teacher_logits["source"] == "detection" and report.teacher_logits["rows_checked"] == 12
    assert report.teacher_logits["max_abs_diff"] < 1e-6


def test_detection_index_with_a_duplicate(data):
    pool, clean, labels = data
    model = tiny_classifier()
    result = _detection(model, pool)
    result.index = result.index.clone()
    result.index[1] = result.index[0]
    with pytest.raises(ValueError, match="the detection's index holds the sample id 0 more than once"):
        purify(model, batches(pool, index=True), clean=batches(clean, labels), detection=result, **SHORT)


def test_flags_of_another_pool(data):
    pool, clean, labels = data
    with pytest.raises(ValueError, match="the detection has 11 flags but the pool loader yielded 12 rows"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, labels),
               detection=torch.ones(11, dtype=torch.bool), **FAST)
    shifted = batches(pool, index=True)
    shifted[-1]["index"] = shifted[-1]["index"] + 100  # ids beyond the flags
    with pytest.raises(ValueError, match="pool row ids reach 111 but the detection has only 12 flags"):
        purify(tiny_classifier(), shifted, clean=batches(clean, labels), detection=ALL, **FAST)


def test_float_flags_rejected(data):
    pool, clean, labels = data
    with pytest.raises(TypeError, match="flags must be booleans"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, labels), detection=torch.rand(12), **FAST)


# ---- models purify cannot work on ------------------------------------------------------------------------

def test_an_automodel_without_head_is_named(data):
    from transformers import BertConfig, BertModel
    pool, clean, labels = data
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, pad_token_id=0)).eval()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"the model \(BertModel\) is a bare base model without a classification "
                                         r"head \(AutoModel\), not a sequence classifier: purify needs the fine-tuned "
                                         r"classifier with its classification head"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=ALL, **SHORT)
    snap.check(model)


def test_a_model_with_adapters_already_is_refused(data):
    from dupfast.purification import PurifyConfig
    from dupfast.purification.lora import attach_lora
    pool, clean, labels = data
    student, _, _ = attach_lora(tiny_classifier(), PurifyConfig())
    for m in (student, student.get_base_model()):
        with pytest.raises(ValueError, match="already carries peft adapters"):
            purify(m, batches(pool), clean=batches(clean, labels), detection=ALL, **SHORT)


def test_model_without_supported_modules_names_its_modules(data):
    pool, clean, labels = data

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(num_labels=2, pad_token_id=0)
            self.emb, self.proj = torch.nn.Embedding(40, 8), torch.nn.Linear(8, 2)

    with pytest.raises(ValueError, match=r"none of the supported LoRA target modules.*\['proj'\]"):
        purify(Odd(), batches(pool), clean=batches(clean, labels), detection=ALL, **FAST)


def test_not_a_sequence_classifier(data):
    pool, clean, labels = data
    with pytest.raises(ValueError, match="config.num_labels >= 2"):
        purify(torch.nn.Linear(3, 2), batches(pool), clean=batches(clean, labels), detection=ALL, **FAST)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        purify("minilm", batches(pool), clean=batches(clean, labels), detection=ALL)


# ---- other bad input -------------------------------------------------------------------------------------

def test_no_flagged_input_warns_and_returns_the_model_unchanged(data):
    pool, clean, labels = data
    model = tiny_classifier("bert")
    snap = Snapshot(model)
    with pytest.warns(UserWarning, match="flagged no input"):
        out, report = purify(model, batches(pool), clean=batches(clean, labels),
                             detection=torch.zeros(12, dtype=torch.bool), **FAST)
    assert out is model
    snap.check(model)
    assert report.stop_reason == "no flagged inputs" and not report.changed


@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_asr": -1.0}, "lambda_asr must be a finite number >= 0"),
    ({"lambda_acc": -0.5}, "lambda_acc must be a finite number >= 0"),
    ({"lambda_asr": 0.0, "lambda_acc": 0.0}, "both 0"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
])
def test_bad_config(data, kwargs, match):
    pool, clean, labels = data
    with pytest.raises(ValueError, match=match):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, labels), detection=ALL, **{**FAST, **kwargs})


def test_clean_set_without_labels_or_missing(data):
    pool, clean, labels = data
    with pytest.raises(ValueError, match="clean batch 0 has no 'labels'"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean), detection=ALL, **FAST)
    with pytest.raises(ValueError, match="needs a labelled clean set"):
        purify(tiny_classifier(), batches(pool), clean=None, detection=ALL, **FAST)
    with pytest.raises(ValueError, match="empty clean set"):
        purify(tiny_classifier(), batches(pool), clean=[], detection=ALL, **FAST)


def test_batches_without_attention_mask(data):
    pool, clean, labels = data
    no_mask = [{"input_ids": b["input_ids"]} for b in batches(pool)]
    with pytest.raises(ValueError, match="pool batch 0 has no 'attention_mask'"):
        purify(tiny_classifier(), no_mask, clean=batches(clean, labels), detection=ALL, **FAST)
    with pytest.raises(TypeError, match="loaders must yield dicts"):
        purify(tiny_classifier(), [torch.zeros(2, 3)], clean=batches(clean, labels),
               detection=torch.ones(2, dtype=torch.bool), **FAST)
    with pytest.raises(ValueError, match="not a rectangular array of numbers"):
        purify(tiny_classifier(), [{"input_ids": [[2, None]], "attention_mask": [[1, 1]]}],
               clean=batches(clean, labels), detection=torch.ones(1, dtype=torch.bool), **FAST)

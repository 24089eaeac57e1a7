"""The probe findings of issue 31 on purification, each ending in a clear error, a warning or a correct result:
NaN / inf logits (teacher: an error before training; student: an error after it, the model restored bit for bit),
a clean set too small for the stopping rule, a pool flagged (nearly) whole, one-shot generators with
detection=None, string flags and config values, a model on the meta device, a decoder classifier fed inputs
longer than its context."""
import math
import re
import warnings

import pytest
import torch

from dupfast import purify
from dupfast.batches import Rows
from dupfast.purification.checks import NearlyAllFlaggedWarning, min_clean_rows
from purify_helpers import TRIGGER, batches, tiny_classifier, toy_rows

SHORT = dict(max_steps=2, min_steps=0, batch_size=8, progress=False)
NAN = float("nan")


@pytest.fixture(scope="module")
def data():
    pool, _ = toy_rows(12, 1)
    clean, labels = toy_rows(12, 2)
    return pool, clean, labels


HALF = torch.arange(12) < 6  # a share that warns of nothing: the tests of other checks stay quiet


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor: NaN compares equal to the same NaN, -0.0 differs from 0.0."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


class Snapshot:
    """The caller's model, bitwise (NaN weights included): values, module tree, parameter objects, modes."""

    def __init__(self, model):
        self.state = {k: _bits(v).clone() for k, v in model.state_dict().items()}
        self.modules = list(model.named_modules())
        self.params = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
        self.modes = [m.training for _, m in self.modules]
        self.attrs = set(vars(model))

    def check(self, model):
        state = model.state_dict()
        assert state.keys() == self.state.keys(), "state keys changed"
        changed = [k for k, v in state.items() if not torch.equal(_bits(v), self.state[k])]
        assert not changed, f"weights changed: {changed[:5]}"
        now = list(model.named_modules())
        assert [(n, id(m)) for n, m in now] == [(n, id(m)) for n, m in self.modules], "module tree changed"
        assert [(n, id(p), p.requires_grad) for n, p in model.named_parameters()] == self.params
        assert [m.training for _, m in now] == self.modes and set(vars(model)) == self.attrs


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# ---- NaN / inf logits -------------------------------------------------------------------------------------

def test_a_model_with_nan_logits_fails_before_any_training(data, monkeypatch):
    import dupfast.purification.api as api
    pool, clean, labels = data
    model = tiny_classifier("bert")
    with torch.no_grad():
        model.classifier.weight[0, 0] = NAN
    snap = Snapshot(model)
    attached = _spy(monkeypatch, api, "attach_student")
    with pytest.raises(ValueError, match=r"the model's logits are NaN or inf on 1 of 1 rows \(the first clean row\), "
                                         r"before any training: the model as given is broken or overflowed"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=HALF, **SHORT)
    assert attached == []
    snap.check(model)


def test_nan_teacher_logits_on_the_flagged_rows_only_are_counted(data, monkeypatch):
    """An inf embedding row of the trigger: the flagged (triggered) rows' logits are NaN, the clean rows' are not;
    purify stops before attaching adapters and names which rows."""
    import dupfast.purification.api as api
    pool, clean, labels = data
    triggered, _ = toy_rows(6, 9, trigger=True)
    flags = torch.tensor([False] * len(pool) + [True] * len(triggered))
    model = tiny_classifier("bert")
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[TRIGGER] = float("inf")
    snap = Snapshot(model)
    attached = _spy(monkeypatch, api, "attach_student")
    with pytest.raises(ValueError, match=r"NaN or inf on (\d+) of \1 rows \(flagged training\)") as err:
        purify(model, batches(pool + triggered), clean=batches(clean, labels), detection=flags, **SHORT)
    held = [int(n) for n in re.findall(r"(\d+) of \d+ rows \(flagged", str(err.value))]
    assert sum(held) == len(triggered) and "clean training" not in str(err.value)
    assert attached == []
    snap.check(model)


@pytest.mark.parametrize("use_lora", [True, False])
def test_a_student_with_nan_logits_after_training_is_an_error_and_the_model_is_restored(data, monkeypatch, use_lora):
    """Training that ends in NaN weights used to 'succeed': now the check after the merge raises inside the
    transaction, which gives the caller's model back bit for bit (as on an interruption)."""
    import dupfast.purification.api as api
    from dupfast.purification.lora import trainable_parameters
    pool, clean, labels = data
    model = tiny_classifier("bert")
    snap = Snapshot(model)
    real = api.train

    def train_then_diverge(student, *args, **kwargs):
        out = real(student, *args, **kwargs)
        with torch.no_grad():
            for _, p in trainable_parameters(student):
                p.fill_(NAN)
        return out

    monkeypatch.setattr(api, "train", train_then_diverge)
    with pytest.raises(ValueError, match=r"after training, the purified model's logits are NaN or inf on \d+ of \d+ "
                                         r"held-out rows checked.*The model was restored exactly as it was given"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=HALF, use_lora=use_lora, **SHORT)
    snap.check(model)
    monkeypatch.undo()  # still a working model: a plain run succeeds with finite logits
    out, report = purify(model, batches(pool), clean=batches(clean, labels), detection=HALF, **SHORT)
    assert report.steps_run == 2 and math.isfinite(report.merge_check["max_abs_logit_diff"])


# ---- the clean set the stopping rule reads -----------------------------------------------------------------

@pytest.mark.parametrize("n, fraction, need", [(2, 0.25, 8), (7, 0.25, 8), (12, 0.1, 20), (5, 0.0, 8)])
def test_a_clean_set_too_small_for_the_stopping_rule(data, n, fraction, need):
    pool, _, _ = data
    clean, labels = toy_rows(n, 2)
    model = tiny_classifier("bert")
    snap = Snapshot(model)
    assert min_clean_rows(fraction) == need
    where = fr"the held-out {fraction:.0%} of the clean set" if fraction else r"the clean training rows themselves"
    with pytest.raises(ValueError, match=fr"purify needs at least {need} labelled clean rows, got {n}: its stopping "
                                         fr"rule measures clean accuracy on {where}"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=HALF, holdout_fraction=fraction,
               **SHORT)
    snap.check(model)


def test_the_smallest_clean_set_allowed_runs(data):
    pool, _, _ = data
    clean, labels = toy_rows(8, 2)
    _, report = purify(tiny_classifier("bert"), batches(pool), clean=batches(clean, labels), detection=HALF, **SHORT)
    assert report.data["clean"] == 8 and report.steps_run == 2


# ---- how much of the pool is flagged ------------------------------------------------------------------------

@pytest.mark.parametrize("n_flag", [12, 11])
def test_nearly_everything_flagged_warns(data, n_flag):
    pool, clean, labels = data
    flags = torch.arange(12) < n_flag
    with pytest.warns(NearlyAllFlaggedWarning, match=fr"nearly everything flagged: {n_flag} of 12 pool inputs "
                                                     r"\(\d+%\): the detector cannot tell poison from clean here"):
        _, report = purify(tiny_classifier("bert"), batches(pool), clean=batches(clean, labels), detection=flags,
                           **SHORT)
    assert report.steps_run == 2  # a warning, not a refusal: the caller may know better
    assert any(w.startswith("nearly everything flagged") for w in report.warnings)


def test_most_but_not_nearly_all_flagged_is_quiet(data):
    pool, clean, labels = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = purify(tiny_classifier("bert"), batches(pool), clean=batches(clean, labels),
                           detection=torch.arange(12) < 10, **SHORT)  # 83%
    assert not [w for w in caught if issubclass(w.category, NearlyAllFlaggedWarning)]
    assert not any("nearly everything" in w for w in report.warnings)


def test_nothing_flagged_is_a_warning_and_the_model_unchanged(data):
    pool, clean, labels = data
    model = tiny_classifier("bert")
    snap = Snapshot(model)
    with pytest.warns(UserWarning, match="the detection flagged no input of the pool: nothing to unlearn"):
        out, report = purify(model, batches(pool), clean=batches(clean, labels),
                             detection=torch.zeros(12, dtype=torch.bool), **SHORT)
    assert out is model and report.stop_reason == "no flagged inputs" and not report.changed
    snap.check(model)


# ---- loaders that can be read only once ----------------------------------------------------------------------

def test_one_shot_loaders_with_detection_none_are_named(data):
    pool, clean, labels = data
    model = tiny_classifier("bert")
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"purify\(detection=None\) runs the detection over the pool loader and then "
                                         r"reads it again, but the pool loader is a one-shot iterator \(generator"):
        purify(model, (b for b in batches(pool)), clean=batches(clean, labels), **SHORT)
    with pytest.raises(ValueError, match=r"the clean loader is a one-shot iterator \(list_iterator\).*Pass a list of "
                                         r"batches or a re-iterable loader"):
        purify(model, batches(pool), clean=iter(batches(clean, labels)), **SHORT)
    snap.check(model)


def test_one_shot_loaders_are_fine_with_a_detection(data):
    pool, clean, labels = data
    _, report = purify(tiny_classifier("bert"), (b for b in batches(pool)),
                       clean=(b for b in batches(clean, labels)), detection=HALF, **SHORT)
    assert report.data["pool"] == 12 and report.data["clean"] == 12 and report.steps_run == 2


# ---- types named up front ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["True", "False"] * 6, r"detection flags must be booleans \(or 0/1 integers\), got <U5 values "
                            r"\['True', 'False', 'True', \.\.\.\]: pass a bool vector"),
    ([None] * 12, r"detection flags must be booleans \(or 0/1 integers\), got object values \[None, None, None"),
])
def test_string_flags_are_named(data, flags, match):
    pool, clean, labels = data
    with pytest.raises(TypeError, match=match):
        purify(tiny_classifier("bert"), batches(pool), clean=batches(clean, labels), detection=flags, **SHORT)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": "1e-3"}, r"lr must be a number, got '1e-3' \(str\), e.g. lr=0.0005"),
    ({"use_lora": "false"}, r"use_lora must be True or False, got 'false' \(str\)"),
    ({"holdout_fraction": "0.25"}, r"holdout_fraction must be a number, got '0.25' \(str\)"),
    ({"max_steps": "2"}, r"max_steps must be an int or None, got '2' \(str\)"),
    ({"seed": 1.5}, r"seed must be an int, got 1.5 \(float\)"),
])
def test_string_config_values_are_named(data, kwargs, match):
    pool, clean, labels = data
    with pytest.raises(ValueError, match=match):
        purify(tiny_classifier("bert"), batches(pool), clean=batches(clean, labels), detection=HALF,
               **{**SHORT, **kwargs})


def test_a_model_on_the_meta_device_is_named(data):
    from transformers import BertConfig, BertForSequenceClassification
    pool, clean, labels = data
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=64, pad_token_id=0))
    with pytest.raises(ValueError, match=r"purify: \d+ of the model's \d+ weight tensors are on the meta device.*"
                                         r"load them first"):
        purify(model, batches(pool), clean=batches(clean, labels), detection=HALF, **SHORT)


# ---- a decoder classifier's context ------------------------------------------------------------------------

def test_a_llama_classifier_refuses_inputs_beyond_its_context(data):
    pool, clean, labels = data
    model = tiny_classifier("llama")  # max_position_embeddings 64, rotary: no error of its own
    snap = Snapshot(model)
    long = [[2] + [11] * 80] + pool[1:]
    with pytest.raises(ValueError, match=r"pool batch 0: an input of 81 positions \(padding included\), longer than "
                                         r"the model's context of 64 positions"):
        purify(model, batches(long), clean=batches(clean, labels), detection=HALF, **SHORT)
    with pytest.raises(ValueError, match=r"the pool rows: an input of 81 positions"):
        purify(model, Rows([list(r) for r in long]), clean=batches(clean, labels), detection=HALF, **SHORT)
    snap.check(model)


# ---- purify_generative: the same pool checks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat():
    from dupfast.generative import chat_batches
    from generative.gen_toy import REFUSAL, reviews, tiny_chat_lm
    model, tok = tiny_chat_lm()
    rows = reviews(12, seed=3)
    pool = chat_batches(tok, [r[0] for r in rows], batch_size=8)
    clean = chat_batches(tok, [r[0] for r in rows], [REFUSAL if r[3] else r[1] for r in rows], batch_size=8)
    return model, pool, clean


def test_purify_generative_warns_when_nearly_everything_is_flagged(chat):
    import copy
    from dupfast.generative import purify_generative
    model, pool, clean = chat
    with pytest.warns(NearlyAllFlaggedWarning, match=r"nearly everything flagged: 12 of 12 pool prompts \(100%\)"):
        _, report = purify_generative(copy.deepcopy(model), pool, clean=clean, detection=torch.ones(12, dtype=bool),
                                      max_steps=1, min_steps=0, max_new_tokens=2, progress=False)
    assert report.steps_run == 1 and report.warnings[0].startswith("nearly everything flagged")


def test_purify_generative_names_one_shot_loaders(chat):
    from dupfast.generative import purify_generative
    model, pool, clean = chat
    with pytest.raises(ValueError, match=r"purify_generative\(detection=None\) .* the pool loader is a one-shot "
                                         r"iterator \(generator"):
        purify_generative(model, (b for b in pool), clean=clean, progress=False)


def test_purify_generative_names_a_model_on_the_meta_device(chat):
    from transformers import LlamaForCausalLM
    from dupfast.generative import purify_generative
    model, pool, clean = chat
    with torch.device("meta"):
        meta = LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match=r"purify_generative: \d+ of the model's \d+ weight tensors are on the meta "
                                         r"device"):
        purify_generative(meta, pool, clean=clean, detection=torch.ones(12, dtype=bool), progress=False)

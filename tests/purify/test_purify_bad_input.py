"""Bad input -> a clear error (or, for an empty flag set, a warning and the model unchanged)."""
import pytest
import torch

from dupfast.purify import purify
from purify_helpers import batches, state_equal, tiny_classifier, toy_rows

FAST = dict(epochs=1, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def data():
    pool, _ = toy_rows(12, 1)
    clean, labels = toy_rows(12, 2)
    return pool, clean, labels


def test_no_flagged_input_warns_and_returns_the_model_unchanged(data):
    pool, clean, labels = data
    model = tiny_classifier("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="flagged no input"):
        out = purify(model, batches(pool), clean=batches(clean, labels), detection=torch.zeros(12, dtype=torch.bool),
                     **FAST)
    assert out is model and type(out).__name__ == "BertForSequenceClassification"
    assert state_equal(before, out.state_dict())
    assert out.dupfast_report.stop_reason == "no flagged inputs" and not out.dupfast_report.changed


def test_model_without_supported_modules_names_its_modules(data):
    pool, clean, labels = data

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_labels": 2, "pad_token_id": 0})()
            self.emb, self.proj = torch.nn.Embedding(40, 8), torch.nn.Linear(8, 2)

    with pytest.raises(ValueError, match=r"none of the supported LoRA target modules.*\['proj'\]"):
        purify(Odd(), batches(pool), clean=batches(clean, labels), detection=torch.ones(12, dtype=torch.bool), **FAST)


def test_clean_labels_outside_the_label_space(data):
    pool, clean, labels = data
    bad = [3 if i == 0 else y for i, y in enumerate(labels)]
    with pytest.raises(ValueError, match=r"clean batch 0: labels \[3\] lie outside the model's label space \[0, 2\)"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, bad), detection=torch.ones(12, dtype=torch.bool),
               **FAST)
    neg = [-1] + labels[1:]
    with pytest.raises(ValueError, match=r"clean batch 0: labels \[-1\]"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, neg), detection=torch.ones(12, dtype=torch.bool),
               **FAST)


@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_asr": -1.0}, "lambda_asr must be a finite number >= 0"),
    ({"lambda_acc": -0.5}, "lambda_acc must be a finite number >= 0"),
    ({"lambda_asr": 0.0, "lambda_acc": 0.0}, "both 0"),
])
def test_bad_lambdas(data, kwargs, match):
    pool, clean, labels = data
    with pytest.raises(ValueError, match=match):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, labels),
               detection=torch.ones(12, dtype=torch.bool), **{**FAST, **kwargs})


def test_flags_of_another_pool(data):
    pool, clean, labels = data
    with pytest.raises(ValueError, match="the detection has 11 flags but the pool loader yielded 12 rows"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, labels),
               detection=torch.ones(11, dtype=torch.bool), **FAST)
    shifted = batches(pool, index=True)
    shifted[-1]["index"] = shifted[-1]["index"] + 100  # ids beyond the flags
    with pytest.raises(ValueError, match="pool row ids reach 111 but the detection has only 12 flags"):
        purify(tiny_classifier(), shifted, clean=batches(clean, labels),
               detection=torch.ones(12, dtype=torch.bool), **FAST)


def test_float_flags_rejected(data):
    pool, clean, labels = data
    with pytest.raises(TypeError, match="flags must be booleans"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean, labels), detection=torch.rand(12), **FAST)


def test_clean_set_without_labels_or_missing(data):
    pool, clean, labels = data
    with pytest.raises(ValueError, match="clean batch 0 has no 'labels'"):
        purify(tiny_classifier(), batches(pool), clean=batches(clean), detection=torch.ones(12, dtype=torch.bool),
               **FAST)
    with pytest.raises(ValueError, match="needs a labelled clean set"):
        purify(tiny_classifier(), batches(pool), clean=None, detection=torch.ones(12, dtype=torch.bool), **FAST)
    with pytest.raises(ValueError, match="empty clean set"):
        purify(tiny_classifier(), batches(pool), clean=[], detection=torch.ones(12, dtype=torch.bool), **FAST)


def test_batches_without_attention_mask(data):
    pool, clean, labels = data
    no_mask = [{"input_ids": b["input_ids"]} for b in batches(pool)]
    with pytest.raises(ValueError, match="pool batch 0 has no 'attention_mask'"):
        purify(tiny_classifier(), no_mask, clean=batches(clean, labels), detection=torch.ones(12, dtype=torch.bool),
               **FAST)
    with pytest.raises(TypeError, match="loaders must yield dicts"):
        purify(tiny_classifier(), [torch.zeros(2, 3)], clean=batches(clean, labels),
               detection=torch.ones(2, dtype=torch.bool), **FAST)


def test_not_a_sequence_classifier(data):
    pool, clean, labels = data
    with pytest.raises(ValueError, match="config.num_labels >= 2"):
        purify(torch.nn.Linear(3, 2), batches(pool), clean=batches(clean, labels),
               detection=torch.ones(12, dtype=torch.bool), **FAST)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        purify("minilm", batches(pool), clean=batches(clean, labels), detection=torch.ones(12, dtype=torch.bool))

"""Purifying a decoder classifier (tiny Llama): left- and right-padded loaders give the same purification; a
decoder without config.pad_token_id, or a model without a sequence-classification head, is a clear error before
the model is touched (the same checks as detection's)."""
import pytest
import torch

import dupfast
from dupfast import purify
from purify_helpers import batches, state_equal, tiny_classifier, toy_rows

SHORT = dict(max_steps=3, min_steps=0, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def data():
    pool, _ = toy_rows(16, 1)
    poison, _ = toy_rows(8, 4, trigger=True)
    clean, labels = toy_rows(40, 2)
    return pool + poison, clean, labels


def _llama():
    return tiny_classifier("llama", dropout=0.0)


def _alone_logits(model, rows):
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows])


@pytest.mark.parametrize("with_detection", [True, False])
def test_either_padding_purifies_alike(data, with_detection):
    pool, clean, labels = data
    out = {}
    for side in ("right", "left"):
        model = _llama()
        left = side == "left"
        pool_b, clean_b = batches(pool, left_pad=left, index=True), batches(clean, labels, left_pad=left)
        det = None
        if with_detection:  # the decoder's own head on these padded batches: its logits are the teacher's
            det = dupfast.detect(model, pool_b, clean=clean_b)
            torch.testing.assert_close(det.logits, _alone_logits(model, pool), rtol=1e-4, atol=1e-5)
            det.flags = torch.arange(len(pool)) >= 16
        purified, report = purify(model, pool_b, clean=clean_b, detection=det, force=True, **SHORT)
        if with_detection:
            assert report.teacher_logits["source"] == "detection"  # the detection's logits passed the check
        out[side] = ({k: v.clone() for k, v in purified.state_dict().items()}, report)
    (s_r, r_r), (s_l, r_l) = out["right"], out["left"]
    assert r_r.data == r_l.data and r_r.steps_run == r_l.steps_run > 0
    for k in s_r:
        torch.testing.assert_close(s_r[k], s_l[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("left", [False, True])
def test_a_decoder_without_pad_token_id_is_refused_before_touching_it(data, left):
    pool, clean, labels = data
    model = _llama()
    model.config.pad_token_id = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    msg = (r"the model \(LlamaForSequenceClassification\) is a decoder classifier .* model.config.pad_token_id is None"
           r".* Set model.config.pad_token_id = tokenizer.pad_token_id \(a tokenizer without a pad token: "
           r"tokenizer.pad_token = tokenizer.eos_token first\)")
    for detection in (torch.ones(len(pool), dtype=torch.bool), None):
        with pytest.raises(ValueError, match=msg):
            purify(model, batches(pool, left_pad=left), clean=batches(clean, labels, left_pad=left),
                   detection=detection, **SHORT)
    assert calls == []
    assert state_equal(before, model.state_dict())


@pytest.mark.parametrize("kind, what", [
    ("LlamaModel", r"a bare base model without a classification head \(AutoModel\)"),
    ("LlamaForCausalLM", r"a language model \(AutoModelForCausalLM: per-token vocabulary logits\)"),
])
def test_a_model_without_classification_head_is_named(data, kind, what):
    import transformers
    pool, clean, labels = data
    model = getattr(transformers, kind)(_llama().config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    msg = (rf"the model \({kind}\) is {what}, not a sequence classifier: purify needs the fine-tuned classifier "
           r"with its classification head: load it with AutoModelForSequenceClassification.from_pretrained")
    for detection in (torch.ones(len(pool), dtype=torch.bool), None):
        with pytest.raises(ValueError, match=msg):
            purify(model, batches(pool), clean=batches(clean, labels), detection=detection, **SHORT)
    assert calls == []
    assert state_equal(before, model.state_dict())

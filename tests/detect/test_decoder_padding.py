"""Decoder classifiers (tiny Llama) under left and right padding, and the models detection cannot screen.

dupfast's "last" pooling reads the attention mask (the last 1), the model's own head reads the last token whose
id is not config.pad_token_id: both must land on the last real token whichever side the batches are padded on,
and a decoder without a pad id, a batch padded with another id on the right, or a model without a
sequence-classification head must be clear errors before any forward pass.
"""
import pytest
import torch

import dupfast
from detect_helpers import batches, make_samples, tiny_bert, tiny_gemma3, tiny_llama
from dupfast.detection import Detector
from dupfast.detection.capture import capture, collect

# seed 1: a random 2-layer Gemma-3 whose default-mode threshold flags part of the pool (seed 0 flags none)
DECODERS = {"llama": tiny_llama, "gemma3": lambda: tiny_gemma3(seed=1)}


@pytest.fixture(scope="module")
def data():
    clean = make_samples(60, seed=11, min_len=2, max_len=14)
    labels = [int(sum(s) % 2) for s in clean]
    pool = make_samples(24, seed=12, min_len=2, max_len=14) + make_samples(
        12, seed=13, lo=80, hi=120, trigger=[110, 111, 112], min_len=2, max_len=14)
    return clean, labels, pool


def _alone(model, seqs):
    """Each row run alone, unpadded: (hidden states per layer [L, d] at its last token, logits [C])."""
    feats, logits = [], []
    with torch.no_grad():
        for s in seqs:
            out = model(input_ids=torch.tensor([s]), output_hidden_states=True)
            feats.append(torch.stack([h[0, -1] for h in out.hidden_states[1:]]))
            logits.append(out.logits[0])
    return torch.stack(feats), torch.stack(logits)


class Counting:
    """A loader that counts how often it is iterated."""

    def __init__(self, items):
        self.items, self.iterated = items, 0

    def __iter__(self):
        self.iterated += 1
        return iter(self.items)


def _forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pooling_reads_the_last_real_token(data, side, family):
    _, _, pool = data
    lm = DECODERS[family]()
    bs = batches(pool, batch_size=12, pad_side=side)
    assert any((b["attention_mask"] == 0).any() for b in bs)  # there is padding on that side
    feats, logits, _, _ = collect(capture(lm, bs, ("last",)))
    alone_feats, alone_logits = _alone(lm, pool)
    # position -1 (or mask.sum()-1 under left padding) would read a pad token: far from these
    torch.testing.assert_close(feats["last"], alone_feats, rtol=1e-4, atol=1e-5)
    # the model's own head (the last token whose id != config.pad_token_id) reads the same token
    torch.testing.assert_close(logits, alone_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("mode", ["default", "dup"])
def test_detection_is_the_same_under_either_padding(data, mode, family):
    clean, labels, pool = data
    lm = DECODERS[family]()
    res = {}
    for clean_side, pool_side in [("right", "right"), ("left", "left"), ("right", "left")]:
        res[clean_side, pool_side] = dupfast.detect(lm, batches(pool, batch_size=12, pad_side=pool_side),
                                                    clean=batches(clean, labels, batch_size=12, pad_side=clean_side),
                                                    mode=mode)
    ref = res["right", "right"]
    assert ref.flags.any() and not ref.flags.all()  # the comparison of flags means something
    for key, r in res.items():
        torch.testing.assert_close(r.scores, ref.scores, rtol=1e-4, atol=1e-4, msg=f"scores {key}")
        torch.testing.assert_close(r.logits, ref.logits, rtol=1e-4, atol=1e-5, msg=f"logits {key}")
        assert torch.equal(r.flags, ref.flags), key
        assert r.threshold == pytest.approx(ref.threshold, rel=1e-4, abs=1e-4)
        assert torch.equal(r.index, ref.index)


def test_a_fitted_detector_scores_either_padding_alike(data):
    clean, labels, pool = data
    lm = tiny_llama()
    det = Detector().fit(lm, batches(clean, labels, pad_side="left"))
    right, left = (det.score(lm, batches(pool, batch_size=7, pad_side=s)) for s in ("right", "left"))
    torch.testing.assert_close(right.scores, left.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(right.flags, left.flags)


def test_right_padding_with_another_id_than_the_pad_token_is_refused(data):
    clean, labels, pool = data
    lm = tiny_llama()
    lm.config.pad_token_id = 5  # the batches are padded with 0: the head would read a pad position on the right
    bs = batches(pool, batch_size=12, pad_side="right")
    calls = _forwards(lm)
    with pytest.raises(ValueError, match=r"pool batch 0 row \d+: padded with token id 0, but model.config.pad_token_id "
                                         r"is 5: the model's head would take this row's logits at padding position"):
        dupfast.detect(lm, bs, detector=Detector().fit(lm, batches(clean, labels, pad_side="left")))
    n = len(calls)
    with pytest.raises(ValueError, match=r"clean batch 0 row \d+: padded with token id 0"):
        dupfast.detect(lm, bs, clean=batches(clean, labels, pad_side="right"))
    assert len(calls) == n  # refused before the first forward
    # left padding with that id still gives the head the last real token: accepted, and correct
    res = dupfast.detect(lm, batches(pool, batch_size=12, pad_side="left"),
                         clean=batches(clean, labels, pad_side="left"))
    torch.testing.assert_close(res.logits, _alone(lm, pool)[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_decoder_without_pad_token_id_is_a_clear_error(data, side):
    clean, labels, pool = data
    lm = tiny_llama()
    det = Detector().fit(lm, batches(clean, labels))
    lm.config.pad_token_id = None
    calls = _forwards(lm)
    msg = (r"the model \(LlamaForSequenceClassification\) is a decoder classifier .* model.config.pad_token_id is None"
           r".* Set model.config.pad_token_id = tokenizer.pad_token_id \(a tokenizer without a pad token: "
           r"tokenizer.pad_token = tokenizer.eos_token first\)")
    for call in (lambda ld, cl: dupfast.detect(lm, ld, clean=cl), lambda ld, cl: dupfast.detect(lm, ld, pool_only=True),
                 lambda ld, cl: dupfast.detect(lm, ld, detector=det)):
        pool_loader = Counting(batches(pool, pad_side=side))
        clean_loader = Counting(batches(clean, labels, pad_side=side))
        with pytest.raises(ValueError, match=msg):
            call(pool_loader, clean_loader)
        assert pool_loader.iterated == clean_loader.iterated == 0
    assert calls == []
    # one padded row at a time would not even be refused by transformers: it reads the last position, a pad
    one = batches(pool[:1], pad_side=side)
    one[0]["input_ids"] = torch.nn.functional.pad(one[0]["input_ids"], (3, 0) if side == "left" else (0, 3))
    one[0]["attention_mask"] = torch.nn.functional.pad(one[0]["attention_mask"], (3, 0) if side == "left" else (0, 3))
    with pytest.raises(ValueError, match=msg):
        dupfast.detect(lm, one, detector=det)


def test_an_encoder_without_pad_token_id_is_fine(data):
    clean, labels, pool = data
    m = tiny_bert(vocab=120)
    m.config.pad_token_id = None  # BERT's head reads [CLS], never the pad id
    res = dupfast.detect(m, batches(pool), clean=batches(clean, labels))
    assert res.scores.shape == (len(pool),)


def test_detect_texts_needs_a_tokenizer_pad_token():
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from tiny_models import tiny_classifier
    lm, tok = tiny_classifier("llama")
    tok.pad_token = None
    with pytest.raises(ValueError, match=r"the tokenizer has no pad token.*tokenizer.pad_token = tokenizer.eos_token"
                                         r".*model.config.pad_token_id = tokenizer.pad_token_id"):
        dupfast.detect_texts(lm, tok, ["good movie", "bad plot"])


def _headless(kind):
    import transformers
    lm = tiny_llama(vocab=120)
    if kind == "BertModel":
        return transformers.BertModel(tiny_bert(vocab=120).config).eval()
    return getattr(transformers, kind)(lm.config).eval()


@pytest.mark.parametrize("kind, what", [
    ("LlamaModel", r"a bare base model without a classification head \(AutoModel\)"),
    ("BertModel", r"a bare base model without a classification head \(AutoModel\)"),
    ("LlamaForCausalLM", r"a language model \(AutoModelForCausalLM: per-token vocabulary logits\)"),
])
def test_a_model_without_classification_head_is_named(data, kind, what):
    clean, labels, pool = data
    model = _headless(kind)
    calls = _forwards(model)
    loader = Counting(batches(pool))
    msg = (rf"the model \({kind}\) is {what}, not a sequence classifier: detection needs the fine-tuned classifier "
           r"with its classification head: load it with AutoModelForSequenceClassification.from_pretrained")
    with pytest.raises(ValueError, match=msg):
        dupfast.detect(model, loader, clean=batches(clean, labels))
    with pytest.raises(ValueError, match=msg):
        dupfast.detect(model, loader)
    assert calls == [] and loader.iterated == 0


def test_per_token_logits_of_a_custom_model_are_refused(data):
    """A model outside transformers' classes is checked by what it returns: [B, T, V] logits are no classifier's."""
    _, _, pool = data
    lm = tiny_llama(vocab=120)

    class TokenLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = lm

        def forward(self, input_ids, attention_mask, **kw):
            out = self.inner.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
            return {"hidden_states": out.hidden_states, "logits": out.last_hidden_state}

    with pytest.raises(ValueError, match=r"logits have shape \(\d+, \d+, 32\), not \[batch, num_labels\]"):
        list(capture(TokenLogits(), batches(pool), ("last",)))

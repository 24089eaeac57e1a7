"""Forward passes that give no usable output are errors, not results (issue 31): NaN / inf logits used to reach
the DetectionResult under finite scores. Also the inputs a model cannot take: longer than a decoder's context,
weights never loaded (meta device)."""
import pytest
import torch

import dupfast
from dupfast.detection.capture import capture
from detect_helpers import batches, make_samples, tiny_bert


@pytest.fixture(scope="module")
def sets():
    clean = make_samples(40, seed=1)
    labels = [int(sum(s) % 2) for s in clean]
    pool = make_samples(12, seed=2)
    return batches(clean, labels), pool


def test_nan_logits_under_finite_hidden_states_are_refused(sets):
    clean, pool = sets
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")  # the head only: every hidden state stays finite
    with pytest.raises(ValueError, match=r"clean batch 0: the model produced NaN/inf logits for 8 of 8 inputs "
                                         r"\(rows \[0, 1, 2, 3, 4, \.\.\.\]\): a broken or overflowed model"):
        dupfast.detect(model, batches(pool), clean=clean)


class _OverflowingHead(torch.nn.Module):
    """tiny_bert whose logits overflow float32 (x 1e44 -> inf) on the inputs holding token 99: finite hidden states,
    non-finite logits on some rows only."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_bert()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        scale = torch.where((input_ids == 99).any(1), 1e35, 1.0).unsqueeze(1)
        out.logits = out.logits.float() * scale * 1e9  # x 1e44 on the rows with 99: float32 overflows to inf
        return out


def test_overflowing_logits_are_counted_per_input():
    seqs = [[1, 20, 21], [1, 99, 22], [1, 23, 24], [1, 25, 99], [1, 26, 27]]
    with pytest.raises(ValueError, match=r"pool batch 0: the model produced NaN/inf logits for 2 of 5 inputs "
                                         r"\(rows \[1, 3\]\)"):
        list(capture(_OverflowingHead(), batches(seqs), ("cls",), name="pool"))
    assert len(list(capture(_OverflowingHead(), batches([seqs[0], seqs[2]]), ("cls",)))) == 1  # rows without 99


def test_non_finite_hidden_states_name_the_inputs_and_autocast():
    """An inf embedding row reaches only the inputs that hold its token; under autocast the hint is to turn it
    off."""
    model = tiny_bert()
    seqs = [[1, 20, 21], [1, 99, 22], [1, 23, 24], [1, 25, 99]]
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[99] = float("inf")
    with pytest.raises(ValueError, match=r"batch 0: the model produced NaN/inf hidden states \(cls pooling\) for 2 of "
                                         r"4 inputs \(rows \[1, 3\]\).*load a float16 model in float32"):
        list(capture(model, batches(seqs), ("cls",)))
    with pytest.raises(ValueError, match=r"for 2 of 4 inputs.*ran under bf16 autocast.*retry with autocast=None"):
        list(capture(model, batches(seqs), ("cls",), autocast="bf16"))


def test_finite_outputs_pass(sets):
    clean, pool = sets
    result = dupfast.detect(tiny_bert(), batches(pool), clean=clean)
    assert torch.isfinite(result.logits).all() and result.logits.shape == (12, 2)


def _llama(context=64):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, pad_token_id=0, num_labels=2, max_position_embeddings=context)
    return LlamaForSequenceClassification(cfg).eval()


def test_a_decoder_classifier_refuses_inputs_beyond_its_context(sets):
    """Rotary positions run past max_position_embeddings without an error: the classifier path now checks it, as
    the generative one does."""
    clean, pool = sets
    model = _llama(context=64)
    long = [[1] + [30] * 64] + pool[1:]  # 65 positions
    with pytest.raises(ValueError, match=r"pool batch 0: an input of 65 positions \(padding included\), longer than "
                                         r"the model's context of 64 positions \(config.max_position_embeddings\)"):
        list(capture(model, batches(long), ("last",), name="pool"))
    fits = [[1] + [30] * 63] + pool[1:]  # exactly 64: taken
    assert sum(cb.logits.shape[0] for cb in capture(model, batches(fits), ("last",))) == 12


def test_a_model_on_the_meta_device_is_named(sets):
    clean, pool = sets
    from transformers import BertConfig, BertForSequenceClassification
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"detection: \d+ of the model's \d+ weight tensors are on the meta device"):
        dupfast.detect(model, batches(pool), clean=clean)

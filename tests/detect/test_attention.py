"""The reading token's attention signal (dupfast/detection/attention.py): the probe's rows are the model's own
attention probabilities, the features and top tokens follow their definition, the detector carries the signal."""
import pytest
import torch

import dupfast
from dupfast.detection import Detector
from dupfast.detection.attention import ATTN, AttentionProbe, attention_features
from dupfast.detection.capture import capture

from detect_helpers import batches, make_samples, tiny_bert, tiny_gemma3, tiny_llama


def _eager_rows(model, enc, pooling):
    """The reference: the eager attention probabilities the model returns, at the reading token's row."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(**enc, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    mask = enc["attention_mask"]
    T = mask.shape[1]
    pos = mask.long().argmax(1) if pooling == "cls" else T - 1 - mask.long().flip(1).argmax(1)
    b = torch.arange(mask.shape[0])
    return torch.stack([a[b, :, pos, :] for a in att], 1)


@pytest.mark.parametrize("arch,pooling,side", [("bert", "cls", "right"), ("llama", "last", "right"),
                                               ("llama", "last", "left"), ("gemma3", "last", "right")])
def test_probe_rows_are_the_models_attention(arch, pooling, side):
    model = {"bert": tiny_bert, "llama": tiny_llama, "gemma3": tiny_gemma3}[arch]()
    if arch == "bert":
        model.set_attn_implementation("sdpa")
    seqs = make_samples(6, seed=4, min_len=3, max_len=14)  # up to 15 tokens: beyond gemma3's 8-token window
    enc = batches(seqs, batch_size=6, pad_side=side, with_index=False)[0]
    ref = _eager_rows(model, enc, pooling)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        probe = AttentionProbe(model, pooling)
        assert probe.use_interface
        with torch.no_grad(), probe, probe.batch(enc["attention_mask"]):
            rows = probe.rows(model(**enc, **probe.forward_kwargs()))
        assert rows.shape == ref.shape
        torch.testing.assert_close(rows, ref.float(), atol=2e-6, rtol=1e-5)
    model.set_attn_implementation("sdpa")


def test_probe_restores_the_attention_registry_even_on_error():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    model = tiny_bert()
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    probe = AttentionProbe(model, "cls")
    with pytest.raises(RuntimeError, match="boom"):
        with probe:
            assert ALL_ATTENTION_FUNCTIONS._local_mapping != before
            raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before


def test_attention_features_by_hand():
    # 2 rows, 1 layer, 2 heads, 4 positions; row 0: reading token at 0, pad at 3; row 1: only the reading token
    rows = torch.tensor([[[[0.5, 0.1, 0.4, 0.0], [0.9, 0.06, 0.04, 0.0]]],
                         [[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    feats, top = attention_features(rows, mask, "cls")
    assert feats.shape == (2, 1, 2)
    torch.testing.assert_close(feats[0, 0], torch.tensor([0.4, 0.06]))  # the reading token's own weight excluded
    torch.testing.assert_close(feats[1, 0], torch.zeros(2))
    # top: mean over the heads of the upper half of the layers (the one layer): (0.1+0.06)/2 < (0.4+0.04)/2
    assert top.tolist() == [2, -1]
    # a decoder reads the last real token: under left padding the reading token is position 3
    feats, top = attention_features(rows.flip(-1), mask.flip(-1), "last")
    torch.testing.assert_close(feats[0, 0], torch.tensor([0.4, 0.06]))
    assert top.tolist() == [1, -1]


def _planted_model():
    """A tiny BERT whose first head, in every layer, points [CLS]'s attention at token 110 (a planted trigger): token
    110's embedding is a fixed direction, every key of the head reads that direction and the query's bias is a
    constant, so q·k grows with how much of the direction a token carries."""
    model = tiny_bert(layers=3, hidden=32, vocab=120, seed=0)
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(32, generator=g)
    direction /= direction.norm()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[110] = 8 * direction
        for layer in model.bert.encoder.layer:
            attn = layer.attention.self
            attn.key.weight[:16] += 0.5 * torch.outer(torch.ones(16), direction)
            attn.query.bias[:16] += 0.5
    return model


def test_detector_flags_by_the_attention_signal_and_names_the_token():
    model = _planted_model()
    clean = make_samples(160, seed=1)
    labels = [int(sum(s) % 2) for s in clean]
    pool = make_samples(60, seed=2) + make_samples(20, seed=3, trigger=[110])
    y = torch.tensor([0] * 60 + [1] * 20)
    res = dupfast.detect(model, batches(pool), clean=batches(clean, labels))
    assert "attn" in res.component_names
    assert res.top_tokens is not None and res.top_tokens.shape == (80,)
    assert (res.top_tokens[60:] == 110).float().mean() >= 0.9  # the planted token is what the reading token sees
    attn = res.components[:, res.component_names.index("attn")]
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y.numpy(), attn.numpy()) > 0.95


def test_detector_round_trip_keeps_the_signal(tmp_path):
    model = _planted_model()
    clean = make_samples(120, seed=1)
    labels = [int(sum(s) % 2) for s in clean]
    pool = batches(make_samples(40, seed=2) + make_samples(10, seed=3, trigger=[110]))
    det = Detector().fit(model, batches(clean, labels))
    assert "attn" in det.scorer.signals
    det.save(tmp_path / "det")
    loaded = Detector.load(tmp_path / "det")
    a, b = det.score(model, pool), loaded.score(model, pool)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.top_tokens, b.top_tokens)


def test_mean_pooling_and_old_features_go_without_the_signal():
    model = tiny_bert()
    clean = make_samples(80, seed=1)
    labels = [int(sum(s) % 2) for s in clean]
    det = Detector(pooling="mean").fit(model, batches(clean, labels))
    assert "attn" not in det.scorer.signals and det.scorer.poolings == ("mean",)
    feats = next(iter(capture(model, batches(clean[:8]), ("cls", "mean"))))
    assert ATTN not in feats.features and feats.top_tokens is None
    with pytest.raises(ValueError, match="attention signal needs"):
        next(iter(capture(model, batches(clean[:8]), ("mean", ATTN))))

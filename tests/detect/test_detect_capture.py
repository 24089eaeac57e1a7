"""One-pass capture: pooling under left/right padding, one forward per batch, bad input."""
import pytest
import torch

from detect_helpers import batches, make_samples, tiny_bert, tiny_llama
from dupfast.detection.capture import capture, last_token_index, first_token_index, resolve_pooling


def _one(model, seqs, pad_side, poolings=("cls", "last", "mean")):
    return next(iter(capture(model, batches(seqs, batch_size=len(seqs), pad_side=pad_side), poolings)))


def test_token_positions_under_both_paddings():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert first_token_index(left).tolist() == [1, 0, 3]
    assert first_token_index(right).tolist() == [0, 0, 0]


def test_decoder_pooling_is_the_same_under_left_and_right_padding():
    lm = tiny_llama()
    seqs = make_samples(5, seed=4, min_len=2, max_len=9)
    r, l = _one(lm, seqs, "right"), _one(lm, seqs, "left")
    for p in ("last", "mean", "cls"):
        torch.testing.assert_close(r.features[p], l.features[p], rtol=1e-4, atol=1e-5)
    # and equal to running each sequence alone (no padding at all)
    for i, s in enumerate(seqs):
        alone = _one(lm, [s], "right")
        torch.testing.assert_close(alone.features["last"][0], r.features["last"][i], rtol=1e-4, atol=1e-5)


def test_encoder_cls_and_mean_ignore_padding():
    m = tiny_bert()
    seqs = make_samples(4, seed=5)
    r = _one(m, seqs, "right")
    for i, s in enumerate(seqs):
        alone = _one(m, [s], "right")
        torch.testing.assert_close(alone.features["cls"][0], r.features["cls"][i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.features["mean"][0], r.features["mean"][i], rtol=1e-4, atol=1e-5)


def test_features_are_the_layer_outputs_without_embeddings():
    m = tiny_bert(layers=3)
    b = batches(make_samples(3, seed=6), batch_size=3)[0]
    with torch.no_grad():
        hs = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
    cb = next(iter(capture(m, [b], ("cls",))))
    assert cb.features["cls"].shape == (3, 3, 32)
    for l in range(3):
        torch.testing.assert_close(cb.features["cls"][:, l], hs[l + 1][:, 0])


def test_auto_pooling_by_family():
    assert resolve_pooling(tiny_bert()) == "cls"
    assert resolve_pooling(tiny_llama()) == "last"
    with pytest.raises(ValueError, match="pooling must be one of"):
        resolve_pooling(tiny_bert(), "max")


def test_exactly_one_forward_per_batch():
    m = tiny_bert()
    calls = []
    h = m.register_forward_hook(lambda *a: calls.append(1))
    data = batches(make_samples(20, seed=7), batch_size=6)
    out = list(capture(m, data, ("cls", "mean"), token_fn=lambda hidden, mask: mask.sum(1)))
    h.remove()
    assert len(calls) == len(data) == len(out) == 4
    assert out[0].token.tolist() == data[0]["attention_mask"].sum(1).tolist()


def test_bf16_autocast_runs_and_stays_close():
    m = tiny_bert()
    data = batches(make_samples(8, seed=8), batch_size=8)
    f32 = next(iter(capture(m, data, ("cls",)))).features["cls"]
    bf = next(iter(capture(m, data, ("cls",), autocast="bf16"))).features["cls"]
    assert bf.dtype == torch.float32
    assert (bf - f32).abs().max() < 0.1 * f32.abs().max()


@pytest.mark.parametrize("native", [True, False])
def test_auto_autocast_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch, native):
    import importlib

    from dupfast.detection.capture import resolve_autocast
    mh = importlib.import_module("dupfast.ops.mahalanobis")  # the module (dupfast.ops.mahalanobis is the op)

    monkeypatch.setattr(mh, "native_bf16_cpu", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_autocast(cpu, "auto") == ("bf16" if native else None)
    assert resolve_autocast(cpu, "bf16") == "bf16" and resolve_autocast(cpu, None) is None
    m = tiny_bert()
    data = batches(make_samples(8, seed=8), batch_size=8)
    auto = next(iter(capture(m, data, ("cls",), autocast="auto"))).features["cls"]
    same = next(iter(capture(m, data, ("cls",), autocast="bf16" if native else None))).features["cls"]
    assert torch.equal(auto, same)


def test_auto_autocast_survives_a_detector_round_trip(tmp_path):
    from dupfast.detection import Detector

    m = tiny_bert()
    clean = batches(make_samples(40, seed=3), labels=[i % 2 for i in range(40)], batch_size=8)
    det = Detector(mode="dup", autocast="auto").fit(m, clean)
    det.save(tmp_path / "det")
    assert Detector.load(tmp_path / "det").autocast == "auto"
    with pytest.raises(ValueError, match="'bf16', 'fp16' or 'auto'"):
        Detector(mode="dup", autocast="int8")


# ---- bad input ---------------------------------------------------------------------------------

def test_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        list(capture(tiny_bert(), [], ("cls",)))


def test_batch_without_attention_mask():
    b = batches(make_samples(2, seed=9))[0]
    del b["attention_mask"]
    with pytest.raises(ValueError, match="no 'attention_mask'"):
        list(capture(tiny_bert(), [b], ("cls",)))


def test_batch_that_is_not_a_dict():
    with pytest.raises(TypeError, match="must yield dicts"):
        list(capture(tiny_bert(), [torch.zeros(2, 3, dtype=torch.long)], ("cls",)))


def test_model_without_hidden_states():
    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Embedding(100, 2)

        def forward(self, input_ids, attention_mask=None, **kw):
            return {"logits": self.lin(input_ids).mean(1)}

    with pytest.raises(ValueError, match="returned no hidden states"):
        list(capture(NoHidden(), batches(make_samples(2, seed=10)), ("cls",)))


def test_non_finite_hidden_states():
    m = tiny_bert()
    with torch.no_grad():
        m.bert.encoder.layer[1].output.dense.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf hidden states"):
        list(capture(m, batches(make_samples(2, seed=11)), ("cls",)))

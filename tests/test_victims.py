"""dupfast.harness.victims (and the batching and fine-tuning it trains with) on a tiny from-scratch BERT (no download):
batching, training, caching, reproducibility."""
import hashlib
import pathlib

import pytest
import torch

from dupfast.harness.data import Sample
from dupfast.batching import TextBatcher, length_sorted_batches, predict, predict_logits
from dupfast.finetune import FinetuneConfig, fit
from dupfast.harness.models import load_model
from dupfast.harness.victims import VictimConfig, cache_key, evaluate_backdoor, train_victim
from tiny_models import sentiment_samples, tiny_bert_dir, one_thread  # noqa: F401 (autouse fixture)



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def data():
    return sentiment_samples(64, seed=1)


def tiny_cfg(tiny_dir, **kw):
    base = dict(model=str(tiny_dir), epochs=2, lr=1e-2, batch_size=8, max_len=16, seed=7)
    base.update(kw)
    return VictimConfig(**base)


def _folder_digest(folder: pathlib.Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


# ---- batching -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
def test_length_sorted_batches_cover_every_index_once(shuffle):
    lengths = [((i * 37) % 23) + 1 for i in range(203)]
    batches = length_sorted_batches(lengths, 16, shuffle=shuffle, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    assert all(len(b) == 16 for b in batches[:-1] if not shuffle)
    assert sum(len(b) < 16 for b in batches) <= 1  # only one partial batch


def test_length_sorted_batches_eval_order_is_sorted_by_length():
    lengths = [5, 1, 9, 3, 7, 2]
    flat = [i for b in length_sorted_batches(lengths, 2, shuffle=False) for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_length_sorted_batches_shuffle_is_seeded():
    lengths = list(range(1, 300))
    assert length_sorted_batches(lengths, 8, True, seed=1) == length_sorted_batches(lengths, 8, True, seed=1)
    assert length_sorted_batches(lengths, 8, True, seed=1) != length_sorted_batches(lengths, 8, True, seed=2)


def test_batcher_pads_each_batch_to_its_own_longest(tiny_dir):
    from dupfast.harness.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    texts = ["good"] * 4 + ["the movie was very very good and fun but the plot was dull"] * 4
    batcher = TextBatcher(tok, texts, [1] * 8, max_len=64)
    widths = []
    for b in batcher.batches(4):
        assert b["input_ids"].shape == b["attention_mask"].shape
        lens = b["attention_mask"].sum(1)
        assert int(lens.max()) == b["input_ids"].shape[1]  # no padding beyond the longest in the batch
        widths.append(b["input_ids"].shape[1])
    assert sorted(widths) == [3, 15]  # [CLS] good [SEP] / 13 words + 2 specials


def test_batcher_truncates_to_max_len(tiny_dir):
    from dupfast.harness.models import load_tokenizer

    batcher = TextBatcher(load_tokenizer(tiny_dir), ["good " * 50], None, max_len=10)
    (b,) = list(batcher.batches(4))
    assert b["input_ids"].shape == (1, 10) and "labels" not in b


def test_predict_logits_keeps_input_order(tiny_dir, data):
    from dupfast.harness.models import load_model

    model, tok = load_model(tiny_dir, num_labels=2)
    texts = [s.text for s in data[:20]]
    batched = predict_logits(model, tok, texts, batch_size=6)
    one_by_one = torch.cat([predict_logits(model, tok, [t], batch_size=1) for t in texts])
    assert batched.shape == (20, 2)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_predict_logits_empty_input(tiny_dir):
    from dupfast.harness.models import load_model

    model, tok = load_model(tiny_dir, num_labels=3)
    assert predict_logits(model, tok, []).shape == (0, 3)


# ---- training -----------------------------------------------------------------------------------

def test_fit_learns_a_separable_task(tiny_dir, data):
    from dupfast.harness.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_dir, num_labels=2)
    before = float((predict(model, tok, [s.text for s in data]) == torch.tensor([s.label for s in data])).float().mean())
    losses = fit(model, tok, data, tiny_cfg(tiny_dir, epochs=6))
    after = float((predict(model, tok, [s.text for s in data]) == torch.tensor([s.label for s in data])).float().mean())
    assert len(losses) == 6 * 8  # 64 samples / batch 8, 6 epochs
    assert sum(losses[-8:]) < sum(losses[:8])
    assert after >= 0.9 and after > before


def test_train_victim_is_reproducible_from_the_seed(tiny_dir, data, tmp_path):
    cfg = tiny_cfg(tiny_dir)
    m1, _, i1 = train_victim(data, cfg, cache_dir=tmp_path / "a", name="t")
    m2, _, i2 = train_victim(data, cfg, cache_dir=tmp_path / "b", name="t")
    assert not i1["cached"] and not i2["cached"]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    # and the seed matters: another seed gives other weights (so the check above can fail)
    m3, _, _ = train_victim(data, tiny_cfg(tiny_dir, seed=8), cache_dir=tmp_path / "c", name="t")
    assert not torch.equal(m3.classifier.weight, m1.classifier.weight)


def test_cached_victim_reloads_with_identical_predictions(tiny_dir, data, tmp_path):
    cfg = tiny_cfg(tiny_dir)
    model, tok, info = train_victim(data, cfg, cache_dir=tmp_path, name="t")
    assert not info["cached"] and info["train_size"] == 64 and info["poisoned"] == 0
    folder = pathlib.Path(info["path"])
    assert folder.parent == tmp_path / "victims" and folder.name == f"t-{cache_key(cfg, data, 2)}"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    texts = [s.text for s in data]
    fresh = predict_logits(model, tok, texts)
    model2, tok2, info2 = train_victim(data, cfg, cache_dir=tmp_path, name="t")
    assert info2["cached"] and info2["path"] == info["path"]
    torch.testing.assert_close(predict_logits(model2, tok2, texts), fresh, atol=1e-6, rtol=0)


def test_changed_config_or_data_gets_a_new_folder_and_never_overwrites(tiny_dir, data, tmp_path):
    cfg = tiny_cfg(tiny_dir, epochs=1)
    _, _, info = train_victim(data, cfg, cache_dir=tmp_path, name="t")
    first = pathlib.Path(info["path"])
    digest = _folder_digest(first)
    _, _, info_lr = train_victim(data, tiny_cfg(tiny_dir, epochs=1, lr=1e-3), cache_dir=tmp_path, name="t")
    flipped = [Sample(s.text, 1 - s.label, s.poison_label) if i == 0 else s for i, s in enumerate(data)]
    _, _, info_data = train_victim(flipped, cfg, cache_dir=tmp_path, name="t")
    paths = {info["path"], info_lr["path"], info_data["path"]}
    assert len(paths) == 3
    assert _folder_digest(first) == digest  # untouched, byte for byte
    assert not list((tmp_path / "victims").glob("*.tmp*"))  # no leftovers from the atomic write


def test_cache_key_depends_on_every_config_field(tiny_dir, data):
    base = tiny_cfg(tiny_dir)
    keys = {cache_key(base, data, 2)}
    for change in [dict(epochs=4), dict(lr=1e-3), dict(batch_size=4), dict(max_len=32), dict(warmup_ratio=0.2),
                   dict(weight_decay=0.01), dict(grad_clip=0.5), dict(seed=1), dict(autocast="bf16")]:
        keys.add(cache_key(tiny_cfg(tiny_dir, **change), data, 2))
    keys.add(cache_key(base, data, 3))
    assert len(keys) == 11


def test_cache_key_of_a_recipe_without_autocast_is_unchanged(tiny_dir, data):
    """autocast=None (the default) hashes as the recipes did before the field existed: cached victims stay."""
    import dataclasses, hashlib, json
    from dupfast.harness.data import fingerprint
    from dupfast.harness.models import model_fingerprint
    cfg = tiny_cfg(tiny_dir)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "autocast")}
    payload = {"config": old, "data": fingerprint(data), "num_labels": 2, "model": model_fingerprint(cfg.model)}
    assert cache_key(cfg, data, 2) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def test_fit_under_bf16_autocast_learns_and_keeps_fp32_weights(tiny_dir, data):
    model, tok = load_model(tiny_dir, num_labels=2)
    losses = fit(model, tok, data, FinetuneConfig(epochs=6, lr=3e-3, batch_size=8, max_len=16, autocast="bf16"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_cache_key_follows_model_contents_not_its_location(tiny_dir, data, tmp_path):
    """A reinstalled environment puts the same weights elsewhere: same key. Retrained weights in the same
    place and shape: a new key."""
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, moved)
    key = cache_key(tiny_cfg(tiny_dir), data, 2)
    assert cache_key(tiny_cfg(moved), data, 2) == key
    weights = next(moved.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(raw))
    assert cache_key(tiny_cfg(moved), data, 2) != key


def test_evaluate_backdoor_reports_cacc_and_asr(tiny_dir, data):
    from dupfast.harness.models import load_model

    model, tok = load_model(tiny_dir, num_labels=2)
    preds = predict(model, tok, [s.text for s in data])
    poison = [Sample(s.text, 1, 1) for s in data[:10]]
    res = evaluate_backdoor(model, tok, data, poison, target=1)
    assert res["cacc"] == pytest.approx(float((preds == torch.tensor([s.label for s in data])).float().mean()))
    assert res["asr"] == pytest.approx(float((preds[:10] == 1).float().mean()))
    assert (res["test_clean_size"], res["test_poison_size"]) == (64, 10)
    nontarget = torch.tensor([s.label != 1 for s in data])
    assert res["asr_floor"] == pytest.approx(float((preds[nontarget] == 1).float().mean()))


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("max_len", 0), ("lr", 0.0),
                                         ("lr", -1e-5), ("warmup_ratio", 1.0), ("warmup_ratio", -0.1),
                                         ("autocast", "fp16"), ("autocast", True)])
def test_victim_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        VictimConfig(**{field: value})


def test_train_victim_rejects_empty_and_one_class_sets(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_victim([], tiny_cfg(tiny_dir), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="only 1 class"):
        train_victim([Sample("good", 1), Sample("great", 1)], tiny_cfg(tiny_dir), cache_dir=tmp_path)


def test_train_victim_rejects_too_few_labels(tiny_dir, data, tmp_path):
    three = data + [Sample("the plot", 2)]
    with pytest.raises(ValueError, match="num_labels=2"):
        train_victim(three, tiny_cfg(tiny_dir), cache_dir=tmp_path, num_labels=2)

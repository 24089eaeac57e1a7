"""Issue 31: a saved detector is checksummed whole (detector.json too) and tied to the model it was fitted on."""
import json
import re
import shutil

import pytest
import torch

import dupfast
from detect_helpers import batches, make_samples, tiny_bert, tiny_texts, tiny_tokenizer, write_table
from dupfast.cli import main
from dupfast.detection import Detector
from dupfast.detection.fingerprint import check_same_model, model_fingerprint
from dupfast.detection.persistence import FORMAT_VERSION

MODIFIED = "detector.json was modified or corrupted after saving"
OTHER = "the detector was fitted on another model"


@pytest.fixture(scope="module")
def fitted(bert, clean_and_pool):
    return Detector(mode="dup").fit(bert, clean_and_pool[0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fitted):
    d = tmp_path_factory.mktemp("det") / "det"
    fitted.save(d)
    return d


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "det")


def _flip_digit(text: str, key: str) -> str:
    """The JSON text with the first non-zero digit of `key`'s value changed (as one damaged byte would), to another
    non-zero digit: the value stays well formed and in range (a malformed one has its own message) and really
    changes (a 17th significant digit may not change a float)."""
    m = re.search(rf'"{key}": ("[0-9a-f]+"|[-+0-9.eE]+)', text)
    assert m, key
    i = min(j for j in range(m.start(1), m.end(1)) if text[j] in "123456789")
    d = int(text[i])
    return text[:i] + str(d - 1 if d > 1 else d + 1) + text[i + 1:]


# ---- detector.json is inside the checksum ---------------------------------------------------------------

@pytest.mark.parametrize("key", ["threshold", "frr", "seed", "calibration_samples", "tensors_sha256",
                                 "weights_sha256"])
def test_one_flipped_digit_in_detector_json_is_refused(saved, tmp_path, key):
    d = _copy(saved, tmp_path)
    Detector.load(d)  # the untouched copy loads
    text = (d / "detector.json").read_text()
    (d / "detector.json").write_text(_flip_digit(text, key))
    with pytest.raises(ValueError, match=f"{re.escape(str(d))} is not a usable saved detector: {MODIFIED}"):
        Detector.load(d)


def test_the_issues_threshold_edit_is_refused(saved, tmp_path, fitted):
    d = _copy(saved, tmp_path)
    info = json.loads((d / "detector.json").read_text())
    assert info["threshold"] == fitted.threshold
    info["threshold"] = fitted.threshold + 8  # 1.754 -> 9.754 removed every flag before
    (d / "detector.json").write_text(json.dumps(info, indent=2))
    with pytest.raises(ValueError, match=f"{MODIFIED}: .* to change a setting, load the original, change the "
                                         "Detector and save it"):
        Detector.load(d)


def test_layout_of_the_json_is_not_content(saved, tmp_path, fitted):
    """The digest is over the canonical JSON: keys reordered and re-indented (a JSON tool's rewrite) still load."""
    d = _copy(saved, tmp_path)
    info = json.loads((d / "detector.json").read_text())
    (d / "detector.json").write_text(json.dumps(dict(reversed(list(info.items()))), indent=None))
    assert Detector.load(d).threshold == fitted.threshold


def test_a_flipped_tensor_byte_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    raw = bytearray((d / "detector.safetensors").read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # past the header: one byte of tensor data
    raw[start + (len(raw) - start) // 2] ^= 0x01
    (d / "detector.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="detector.safetensors does not match the SHA-256 recorded in detector.json"):
        Detector.load(d)


def test_tensors_changed_together_with_their_recorded_digest_are_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    from dupfast.detection.persistence import tensors_sha256
    d = _copy(saved, tmp_path)
    t = load_file(str(d / "detector.safetensors"))
    t["znorm.std"] = t["znorm.std"] * 2  # still valid: only the JSON's own digest can tell
    save_file(t, str(d / "detector.safetensors"))
    info = json.loads((d / "detector.json").read_text())
    info["tensors_sha256"] = tensors_sha256(t)
    (d / "detector.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=MODIFIED):
        Detector.load(d)


def test_edited_through_the_api_and_saved_again_loads(saved, tmp_path, bert, clean_and_pool, fitted):
    det = Detector.load(saved)
    det.fitted_calibration.threshold = 9.754
    det.save(tmp_path / "edited")
    again = Detector.load(tmp_path / "edited")
    assert again.threshold == 9.754
    assert again.model_fingerprint == fitted.model_fingerprint  # the fingerprint survives load -> save -> load
    res = again.score(bert, clean_and_pool[1])
    assert res.threshold == 9.754 and torch.equal(res.flags, res.scores > 9.754)


def test_an_older_format_is_refused_with_what_to_do(saved, tmp_path):
    d = _copy(saved, tmp_path)
    info = json.loads((d / "detector.json").read_text())
    for k in ("detector_sha256", "model_fingerprint"):  # what a format-2 file lacks
        info.pop(k)
    info["format_version"] = 2
    (d / "detector.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"detector format 2 is not {FORMAT_VERSION} \\(saved by an older dupfast, "
                                         "without a checksum over detector.json or a fingerprint of its model, so "
                                         "it cannot be checked\\): fit the detector again and save it"):
        Detector.load(d)


@pytest.mark.parametrize("key", ["detector_sha256", "model_fingerprint"])
def test_a_missing_digest_or_fingerprint_field_is_refused(saved, tmp_path, key):
    d = _copy(saved, tmp_path)
    info = json.loads((d / "detector.json").read_text())
    info.pop(key)
    (d / "detector.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"detector.json.{key} is missing"):
        Detector.load(d)


# ---- the model fingerprint ------------------------------------------------------------------------------

def test_the_fingerprint_records_architecture_sizes_and_weights(fitted):
    fp = fitted.model_fingerprint
    assert {k: fp[k] for k in ("model_type", "class", "num_layers", "hidden_size", "num_labels", "vocab_size")} == {
        "model_type": "bert", "class": "BertForSequenceClassification", "num_layers": 3, "hidden_size": 32,
        "num_labels": 2, "vocab_size": 120}
    assert re.fullmatch("[0-9a-f]{64}", fp["weights_sha256"])
    assert fp["weights"][0] == "bert.embeddings.word_embeddings.weight"
    assert fp["weights"][-2:] == ["classifier.weight", "classifier.bias"]


def test_another_model_of_the_same_shape_is_refused(saved, clean_and_pool, bert):
    _, pool, _ = clean_and_pool
    other = tiny_bert(seed=1)  # same config, other weights: it flagged 48 of 48 before
    det = Detector.load(saved)
    calls = []
    other.register_forward_hook(lambda *a: calls.append(1))
    msg = (f"{OTHER} \\(BertForSequenceClassification\\): other weights \\(SHA-256 of "
           "bert.embeddings.word_embeddings.weight, .*classifier.bias differs\\).*allow_other_model=True")
    with pytest.raises(ValueError, match=msg):
        det.score(other, pool)
    with pytest.raises(ValueError, match=OTHER):
        dupfast.detect(other, pool, detector=det)
    assert calls == []  # refused before the forward pass
    res = det.score(other, pool, allow_other_model=True)  # the explicit override scores it
    assert res.scores.shape == (60,)


def test_only_the_classifier_head_changed_is_another_model(fitted, clean_and_pool):
    other = tiny_bert()
    with torch.no_grad():
        other.classifier.weight[0, 0] += 0.01
    with pytest.raises(ValueError, match=OTHER):
        fitted.score(other, clean_and_pool[1])


def test_what_differs_is_named(fitted, clean_and_pool):
    with pytest.raises(ValueError, match=f"{OTHER} .*: num_layers 3 -> 4; other weights"):
        fitted.score(tiny_bert(layers=4), clean_and_pool[1])


def test_the_same_model_reloaded_scores_identically(tmp_path, saved, fitted, bert, clean_and_pool):
    from transformers import AutoModelForSequenceClassification
    _, pool, _ = clean_and_pool
    bert.save_pretrained(str(tmp_path / "model"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model")).eval()
    assert reloaded is not bert
    a = fitted.score(bert, pool)
    b = Detector.load(saved).score(reloaded, pool)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    # built again from the same seed: the same weights, the same model
    Detector.load(saved).score(tiny_bert(), pool[:1])


def test_dtype_and_wrappers(fitted, bert):
    """bf16 and fp64 copies of the same weights are the same model (values hashed bf16-rounded); fp16 rounds
    differently and is another; a DDP-like `.module` wrapper is looked through."""
    import copy
    fp = fitted.model_fingerprint
    check_same_model(fp, copy.deepcopy(bert).to(torch.bfloat16))
    check_same_model(fp, copy.deepcopy(bert).double())
    with pytest.raises(ValueError, match=f"{OTHER}.*other weights"):
        check_same_model(fp, copy.deepcopy(bert).half())

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    check_same_model(fp, Wrapper(bert))
    assert model_fingerprint(Wrapper(bert))["class"] == "BertForSequenceClassification"


def test_a_model_without_loaded_weights_is_a_clear_error(fitted):
    with torch.device("meta"):
        meta = tiny_bert()
    with pytest.raises(ValueError, match="is on the meta device .* load the model with its weights"):
        check_same_model(fitted.model_fingerprint, meta)


def test_pool_fitted_detectors_are_fingerprinted(bert):
    pool = batches(make_samples(150, seed=2))
    det = Detector(mode="dan", pool_trim=0.3).fit_pool(bert, pool)
    assert det.model_fingerprint == model_fingerprint(bert)
    with pytest.raises(ValueError, match=OTHER):
        det.score(tiny_bert(seed=1), pool)


def test_a_detector_fitted_on_features_has_no_fingerprint_and_no_check(tmp_path, fitted, bert, clean_and_pool):
    from dupfast.detection.capture import capture, collect
    clean, pool, _ = clean_and_pool
    feats, logits, labels, _ = collect(capture(bert, clean, ("cls",), None, need_labels=True))
    det = Detector(mode="dup", pooling="cls").fit_features(feats, labels, logits=logits)
    assert det.model_fingerprint is None
    det.save(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "detector.json").read_text())["model_fingerprint"] is None
    loaded = Detector.load(tmp_path / "d")
    assert loaded.model_fingerprint is None
    assert loaded.score(tiny_bert(seed=1), pool).scores.shape == (60,)  # nothing to compare with: scored
    # a model-fitted detector refitted on features forgets its model
    refit = Detector(mode="dup", pooling="cls").fit(bert, clean)
    assert refit.model_fingerprint is not None
    refit.fit_features(feats, labels, logits=logits)
    assert refit.model_fingerprint is None


def test_cli_with_a_detector_of_another_model(tmp_path, model_dir, capsys):
    texts = tiny_texts(40, seed=1)
    clean = write_table(tmp_path / "clean.tsv", ["sentence", "label"], [(t, i % 2) for i, t in enumerate(texts)], "\t")
    pool = write_table(tmp_path / "pool.tsv", ["sentence"], [(t,) for t in tiny_texts(10, seed=2)], "\t")
    assert main(["detect", str(model_dir), "--texts", str(pool), "--clean", str(clean), "--out", str(tmp_path / "a"),
                 "--mode", "dup", "--threads", "1"]) == 0
    other = tmp_path / "other"
    m = tiny_bert(vocab=120, seed=1)
    m.config.architectures = ["BertForSequenceClassification"]
    m.save_pretrained(str(other))
    tiny_tokenizer().save_pretrained(str(other))
    capsys.readouterr()
    rc = main(["detect", str(other), "--texts", str(pool), "--detector", str(tmp_path / "a" / "detector"),
               "--out", str(tmp_path / "b"), "--threads", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and not (tmp_path / "b" / "scores.csv").exists()
    assert f"{OTHER} (BertForSequenceClassification): other weights" in err and "Traceback" not in err

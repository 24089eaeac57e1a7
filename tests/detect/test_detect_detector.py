"""Detector end to end on a tiny BERT: fit/score, save/load, pool calibration, baselines, bad input."""
import json
import warnings

import pytest
import torch

import dupfast
from detect_helpers import batches, make_samples, tiny_bert
from dupfast.harness import metrics
from dupfast.detection import Detector
from dupfast.detection.calibration import split

MODES = ("dup", "default", "dan")


@pytest.mark.parametrize("mode", MODES)
def test_fit_score_separates_out_of_distribution_inputs(bert, clean_and_pool, mode):
    clean, pool, y = clean_and_pool
    det = Detector(mode=mode).fit(bert, clean)
    res = det.score(bert, pool)
    assert res.scores.shape == (60,) and res.flags.dtype == torch.bool
    assert torch.equal(res.flags, res.scores > res.threshold)
    assert res.index.tolist() == list(range(60))
    assert metrics.auroc(y, res.scores) > 0.9
    assert res.flags[y == 1].float().mean() > res.flags[y == 0].float().mean()


def test_dup_result_parts(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    res = Detector(mode="dup").fit(bert, clean).score(bert, pool)
    assert res.component_names == ("md", "ss")
    assert len(res.selected_layers) == 3 and res.layer_distances.shape == (60, 3)
    assert res.transitions["cosines"].shape == (60, 2) and res.transitions["concentration"].shape == (60,)
    assert ((res.transitions["concentration"] > 0) & (res.transitions["concentration"] <= 1)).all()


def test_threshold_holds_the_frr_on_the_validation_half(bert, clean_and_pool):
    clean, _, _ = clean_and_pool
    det = Detector(mode="dup", frr=0.1).fit(bert, clean)
    res = det.score(bert, clean)
    _, val = split(120, None, det.seed, det.calibration_fraction)
    frr = res.flags[val].float().mean().item()
    assert frr <= 0.1 + 1 / len(val)


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(tmp_path, bert, clean_and_pool, mode):
    clean, pool, _ = clean_and_pool
    det = Detector(mode=mode).fit(bert, clean)
    a = det.score(bert, pool)
    det.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["detector.json", "detector.safetensors"]
    json.loads((tmp_path / "det" / "detector.json").read_text())  # plain JSON, no pickle anywhere
    b = Detector.load(tmp_path / "det").score(bert, pool)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    assert a.threshold == b.threshold


def test_loading_for_a_model_with_another_hidden_size(tmp_path, bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    Detector(mode="dup").fit(bert, clean).save(tmp_path / "d")
    other = tiny_bert(hidden=48)
    # refused before the forward pass by the model fingerprint (test_detect_integrity.py), naming the width
    with pytest.raises(ValueError, match="fitted on another model .*: hidden_size 32 -> 48"):
        Detector.load(tmp_path / "d").score(other, pool)
    # scored anyway, the features' width still stops it
    with pytest.raises(ValueError, match="fitted on 3 layers of size 32, but these features are 3 layers of size 48"):
        Detector.load(tmp_path / "d").score(other, pool, allow_other_model=True)


def test_load_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved dupfast detector"):
        Detector.load(tmp_path)


def test_pool_only_calibration(bert):
    # pool calibration needs the poisoned share well below pool_trim (here 9% poisoned, trim 30%)
    pool = batches(make_samples(150, seed=2) + make_samples(15, seed=3, lo=80, hi=120, trigger=[110, 111, 112]))
    y = torch.tensor([0] * 150 + [1] * 15)
    det = Detector(mode="dup", pool_trim=0.3)
    res = det.fit_pool(bert, pool).pool_result
    assert det.calibration["source"] == "pool" and det.calibration["iterations"] >= 1
    assert metrics.auroc(y, res.scores) > 0.8  # an easy case (far out-of-vocabulary poison); see README for SST-2
    # the detector keeps the last fit: it reproduces the returned scores outside its own calibration half
    again = det.score(bert, pool).scores
    assert (again == res.scores).float().mean() > 0.45
    res2 = dupfast.detect(bert, pool, mode="dup", pool_trim=0.3, pool_only=True)
    torch.testing.assert_close(res.scores, res2.scores, rtol=0, atol=0)


def test_top_level_detect_equals_detector(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    a = dupfast.detect(bert, pool, clean=clean, mode="dup")
    b = dupfast.Detector(mode="dup").fit(bert, clean).score(bert, pool)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_sorted_by_index_restores_input_order(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    det = Detector(mode="dup").fit(bert, clean)
    shuffled = [dict(b) for b in reversed(pool)]
    res = det.score(bert, shuffled).sorted_by_index()
    ref = det.score(bert, pool)
    assert res.index.tolist() == list(range(60))
    torch.testing.assert_close(res.scores, ref.scores, rtol=1e-6, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------

def test_one_class_calibration_warns_and_uses_all_layers(bert):
    seqs = make_samples(60, seed=12)
    with pytest.warns(UserWarning, match="Calinski-Harabasz is undefined with 1 class.*using all 3 layers"):
        det = Detector(mode="dup").fit(bert, batches(seqs, [0] * 60))
    assert det.scorer.layers == [0, 1, 2]


def test_too_few_calibration_samples(bert):
    seqs = make_samples(12, seed=13)
    with pytest.raises(ValueError, match="clean set is too small: 6 calibration and 6 validation samples"):
        Detector(mode="dup").fit(bert, batches(seqs, [i % 2 for i in range(12)]))


def test_empty_clean_loader(bert):
    with pytest.raises(ValueError, match="no batches"):
        Detector(mode="dup").fit(bert, [])


def test_clean_loader_without_labels(bert):
    with pytest.raises(ValueError, match="must yield `labels`"):
        Detector(mode="dup").fit(bert, batches(make_samples(60, seed=14)))


def test_non_finite_features():
    x = torch.randn(60, 3, 8)
    x[5, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="contain NaN or inf"):
        Detector(mode="dup", pooling="cls").fit_features({"cls": x}, torch.arange(60) % 2, num_classes=2)


def test_scoring_before_fitting(bert, clean_and_pool):
    with pytest.raises(RuntimeError, match="not fitted"):
        Detector().score(bert, clean_and_pool[1])


def test_bad_options():
    with pytest.raises(ValueError, match="unknown mode 'foo'"):
        Detector(mode="foo")
    with pytest.raises(ValueError, match="frr must lie in"):
        Detector(frr=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        Detector(mode="dup", top_k=0)


def test_index_out_of_range(bert):
    seqs = make_samples(60, seed=15)
    data = batches(seqs, [i % 2 for i in range(60)], index_offset=100)
    with pytest.raises(ValueError, match="index` values must be the sample ids 0..59"):
        Detector(mode="dup").fit(bert, data)


def test_no_warning_on_the_happy_path(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Detector(mode="dup").fit(bert, clean).score(bert, pool)

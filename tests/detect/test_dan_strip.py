"""DAN's score and the classifier STRIP score against hand-computed cases (their numbers fill README tables).

DAN (scorers/dan.py): per layer, the squared Mahalanobis distance to the nearest class mean under one tied,
shrunk covariance of the class-centred calibration features. STRIP (scorers/strip.py): minus the mean
entropy (bits) of the predictions on `repeat` perturbed copies of a text; threshold at the clean percentile.
"""
import math
import random

import numpy as np
import pytest
import torch

from dupfast import batching
from dupfast.detection.scorers.dan import DanScorer
from dupfast.detection.scorers.strip import StripDetector

# ---- DAN -----------------------------------------------------------------------------------------


def test_dan_one_dimension_by_hand():
    """d = 1: class 0 at {0, 2} (mean 1), class 1 at {10, 12} (mean 11); the class-centred features are
    {-1, 1, -1, 1}, variance 1 (shrinkage does nothing to a 1x1 covariance). Squared distance to the nearest
    class mean: x = 4 -> min(3^2, 7^2) = 9; 11 -> 0; 6 -> min(25, 25) = 25; -1 -> 4."""
    calib = torch.tensor([0.0, 2.0, 10.0, 12.0]).view(4, 1, 1)
    scorer = DanScorer().fit({"mean": calib}, torch.tensor([0, 0, 1, 1]), num_classes=2)
    assert scorer.pooling == "mean" and scorer.component_names == ("layer0",) and scorer.weights == (1.0,)
    out = scorer.score({"mean": torch.tensor([4.0, 11.0, 6.0, -1.0]).view(4, 1, 1)})
    assert out.columns.dtype == torch.float64
    torch.testing.assert_close(out.columns[:, 0], torch.tensor([9.0, 0.0, 25.0, 4.0], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def dan_numpy(calib, labels, test, shrinkage):
    """The formula written out: class means of the classes present, the pooled within-class covariance
    (divided by n), shrunk to (1 - s) C + s tr(C) / d I, and min_c (x - mu_c)^T C^-1 (x - mu_c) per layer."""
    n, n_layers, d = calib.shape
    classes = np.unique(labels)
    cols = []
    for layer in range(n_layers):
        X = calib[:, layer]
        mus = np.stack([X[labels == c].mean(0) for c in classes])
        centred = X - mus[np.searchsorted(classes, labels)]
        C = centred.T @ centred / n
        C = (1 - shrinkage) * C + shrinkage * np.trace(C) / d * np.eye(d)
        diff = test[:, layer, None, :] - mus[None]
        cols.append(np.einsum("nki,ij,nkj->nk", diff, np.linalg.inv(C), diff).min(1))
    return np.stack(cols, 1)


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.5])
def test_dan_matches_the_formula_written_out(shrinkage):
    """Two layers, d = 3, three declared classes of which only 0 and 2 occur (an absent class must not
    become a mean), against dan_numpy."""
    g = np.random.default_rng(0)
    labels = np.array([0, 2] * 15)
    calib = g.normal(size=(30, 2, 3)) + 3.0 * labels[:, None, None] * np.array([1.0, -0.5, 0.2])
    calib[:, 1] *= np.array([1.0, 4.0, 0.3])  # a second layer with unequal scales
    test = g.normal(size=(7, 2, 3)) * 2
    scorer = DanScorer(shrinkage=shrinkage).fit({"mean": torch.tensor(calib, dtype=torch.float32)},
                                                torch.tensor(labels), num_classes=3)
    assert scorer.means.shape == (2, 2, 3) and scorer.weights == (0.5, 0.5)
    got = scorer.score({"mean": torch.tensor(test, dtype=torch.float32)}).columns.numpy()
    # the scorer sees fp32 features: compare with the formula on those same rounded values
    want = dan_numpy(calib.astype(np.float32).astype(np.float64), labels,
                     test.astype(np.float32).astype(np.float64), shrinkage)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


# ---- STRIP (classifier) --------------------------------------------------------------------------


def fake_predictions(monkeypatch, logits):
    """predict_logits returns the given rows in order (one row per perturbed copy), recording the texts."""
    rows = [torch.tensor(r, dtype=torch.float32) for r in logits]
    seen = []

    def predict(model, tokenizer, texts, batch_size=64, max_len=128):
        seen.extend(texts)
        return torch.stack([rows.pop(0) for _ in texts])

    monkeypatch.setattr(batching, "predict_logits", predict)
    return seen


H34 = 2 - 0.75 * math.log2(3)  # entropy in bits of (3/4, 1/4): logits (log 3, 0)


def test_strip_scores_by_hand(monkeypatch):
    """repeat = 2: text 0's copies predict (1/2, 1/2) (1 bit) and (3/4, 1/4) (H34 bits); text 1's a certain
    class (0 bits) and (3/4, 1/4); then a text whose copies give 4 equal classes (2 bits). score = -mean
    entropy."""
    det = StripDetector(repeat=2)
    det.words, det.order = np.array(["zebra"]), np.zeros((1, 1), dtype=int)
    det.rng = random.Random(0)
    l3 = math.log(3.0)
    seen = fake_predictions(monkeypatch, [[0.0, 0.0], [l3, 0.0], [200.0, 0.0], [l3, 0.0],
                                          [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = det.scores(None, None, ["a b", "c d"])
    assert len(seen) == 4  # two perturbed copies per text, text by text
    torch.testing.assert_close(got, torch.tensor([-(1 + H34) / 2, -(0 + H34) / 2], dtype=torch.float64),
                               rtol=1e-7, atol=1e-7)  # predict_logits returns fp32 logits
    four = det.scores(None, None, ["g h"])
    torch.testing.assert_close(four, torch.tensor([-2.0], dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_strip_threshold_and_flags_by_hand(monkeypatch):
    """20 clean texts, half for the TF-IDF words, half for the threshold: every validation copy predicts
    (1/2, 1/2), so every clean score is -1 and the threshold (any percentile) is -1. A text whose copies
    stay at (3/4, 1/4) scores -H34 > -1 and is flagged; one at (1/2, 1/2) scores -1 and is not."""
    clean = ["zebra zebra quokka"] * 20
    det_rows = [[0.0, 0.0]] * (10 * 3)
    fake_predictions(monkeypatch, det_rows + [[0.0, 0.0]] * 3 + [[math.log(3.0), 0.0]] * 3)
    det = StripDetector(repeat=3, frr=0.1).fit(None, None, clean)
    assert det.threshold == -1.0
    assert sorted(det.words) == ["quokka", "zebra"]
    res = det.score(None, None, ["one two three four", "five six seven eight"])
    want = torch.tensor([-1.0, -H34], dtype=torch.float64)
    torch.testing.assert_close(res.scores, want, rtol=1e-7, atol=1e-7)  # logits are fp32
    assert res.flags.tolist() == [False, True] and res.component_names == ("strip",)


def test_strip_perturbation_swaps_in_the_top_tfidf_words():
    """swap_ratio 1/2 of a 4-word text: 2 swaps, the i-th with the i-th top TF-IDF word of a calibration text
    (here zebra (tf 2) then quokka): the last swap always survives, nothing else enters."""
    det = StripDetector(swap_ratio=0.5)
    det.words, det.order = np.array(["quokka", "zebra"]), np.array([[1, 0], [1, 0]])
    for seed in range(20):
        det.rng = random.Random(seed)
        out = det.perturb("w1 w2 w3 w4").split()
        assert len(out) == 4 and "quokka" in out
        changed = [w for w in out if w not in ("w1", "w2", "w3", "w4")]
        assert 1 <= len(changed) <= 2 and set(changed) <= {"quokka", "zebra"}

"""Metrics against hand-computed cases (sklearn only for the confusion counts), the OpenBackdoor
behind-detector rule, bad input."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from dupfast.harness import metrics


def test_accuracy_cacc_and_asr_by_hand():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert metrics.cacc(torch.tensor([2, 1, 0]), np.array([2, 0, 0])) == pytest.approx(2 / 3)
    # ASR: share of triggered non-target inputs predicted as the target
    assert metrics.asr([1, 1, 0, 1, 2], target=1) == 0.6
    assert metrics.asr(torch.tensor([0, 0]), target=1) == 0.0
    assert metrics.asr(np.array([3, 3]), target=np.int64(3)) == 1.0


def test_accuracy_and_asr_bad_input():
    with pytest.raises(ValueError, match=r"predictions \(3,\) and labels \(2,\) differ in shape"):
        metrics.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="accuracy of an empty set is undefined"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="ASR of an empty poisoned set"):
        metrics.asr([], 1)
    with pytest.raises(ValueError, match="target label must be an integer"):
        metrics.asr([1, 0], "1")


def test_auroc_by_hand_ties_included():
    """AUROC = P(poisoned score > clean score) + 1/2 P(tie), over all (clean, poisoned) pairs, by hand."""
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.auroc([0, 1], [0.5, 0.5]) == 0.5  # ties count half
    assert metrics.auroc([0, 1, 0, 1], [3.0, 3.0, 3.0, 3.0]) == 0.5  # all tied
    # 1 of the 4 (clean, poisoned) pairs is mis-ordered -> 0.75
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) == 0.75
    # clean 0.2 loses to all three poisoned (3); clean 0.5 ties two and loses to 0.9 (0.5 + 0.5 + 1) -> 5 / 6
    assert metrics.auroc([0, 0, 1, 1, 1], [0.2, 0.5, 0.5, 0.5, 0.9]) == pytest.approx(5 / 6, abs=1e-15)
    # poisoned 2 beats clean 1, ties clean 2 (1.5); poisoned 3 beats 1 and 2, ties 3 (2.5) -> 4 / 6
    assert metrics.auroc(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 2, 3, 2, 3])) == pytest.approx(2 / 3)
    assert metrics.auroc(np.array([True, False, True]), [1.0, 1.0, -1.0]) == 0.25  # (0.5 + 0) / 2
    # many ties on random integer scores: the pairwise count itself
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 6, 300) + y
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    want = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
    assert metrics.auroc(y, s) == pytest.approx(want, abs=1e-12)


def test_auroc_bad_input():
    with pytest.raises(ValueError, match="needs both clean"):
        metrics.auroc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.auroc([0, 1], [0.2, np.nan])
    with pytest.raises(ValueError, match=r"poison labels must hold only 0/1.*\[0, 1, 2\]"):
        metrics.auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.auroc([0, 1], [0.1, 0.2, 0.3])


def test_detection_report_by_hand():
    #            clean clean clean clean pois pois pois
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    f = np.array([0, 1, 0, 0, 1, 1, 0])
    r = metrics.detection_report(y, f, scores=[0.1, 0.7, 0.2, 0.3, 0.9, 0.8, 0.25])
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 3)
    assert r["frr"] == pytest.approx(1 / 4)  # clean flagged
    assert r["far"] == pytest.approx(1 / 3)  # poison missed
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["auroc"] == pytest.approx(10 / 12)  # poison 0.25 ranks below clean 0.3 and 0.7: 2 of 12 pairs
    # a detector that flags nothing: precision and F1 0, every poisoned sample accepted
    none = metrics.detection_report(y, np.zeros(7, bool))
    assert (none["precision"], none["f1"], none["far"], none["frr"]) == (0.0, 0.0, 1.0, 0.0)
    assert "auroc" not in none


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=60))
def test_detection_report_matches_sklearn(pairs):
    y = np.array([p[0] for p in pairs], dtype=int)
    f = np.array([p[1] for p in pairs], dtype=int)
    r = metrics.detection_report(y, f)
    tn, fp, fn, tp = skm.confusion_matrix(y, f, labels=[0, 1]).ravel()
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (tp, fp, fn, tn)
    if f.any():
        assert r["precision"] == pytest.approx(skm.precision_score(y, f))
    if y.any():
        assert r["recall"] == pytest.approx(skm.recall_score(y, f))
        assert r["far"] == pytest.approx(1 - r["recall"])
        assert r["f1"] == pytest.approx(skm.f1_score(y, f, zero_division=0.0))
    else:
        assert np.isnan(r["recall"]) and np.isnan(r["far"])
    if (y == 0).any():
        # FRR is the false-positive rate of the ROC
        assert r["frr"] == pytest.approx(fp / (fp + tn))


def test_detection_report_bad_input():
    with pytest.raises(ValueError, match=r"flags must hold only 0/1"):
        metrics.detection_report([0, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.detection_report([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="poison labels is empty"):
        metrics.detection_report([], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.detection_report([[0, 1]], [[0, 1]])


def test_far_at_frr_follows_the_dup_threshold_rule():
    clean = np.arange(100, dtype=float)           # 95th percentile (linear) = 94.05
    poison = np.array([50.0, 94.0, 95.0, 200.0])  # 50 and 94 fall at or below it: accepted
    y = np.r_[np.zeros(100), np.ones(4)]
    s = np.r_[clean, poison]
    assert metrics.far_at_frr(y, s, frr=0.05) == 0.5
    tau = np.percentile(clean, 95)                 # DUP: flag iff S > percentile(clean, 100 (1 - frr))
    assert metrics.far_at_frr(y, s, 0.05) == np.mean(~(poison > tau))
    assert metrics.far_at_frr(y, s, 0.0) == 0.75   # tau = max clean = 99: only 200 is flagged
    with pytest.raises(ValueError, match=r"frr must be in \[0, 1\)"):
        metrics.far_at_frr(y, s, 1.0)
    with pytest.raises(ValueError, match="needs both clean"):
        metrics.far_at_frr(np.ones(4), poison)
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.far_at_frr([0, 1], [np.inf, 1.0])


def test_behind_detector_openbackdoor_rule():
    preds = np.array([0, 1, 1, 0])
    out = metrics.behind_detector(preds, [False, True, False, True], num_classes=2)
    assert out.tolist() == [0, 2, 1, 2]
    assert preds.tolist() == [0, 1, 1, 0]  # input untouched
    t = torch.tensor([3, 1])
    assert metrics.behind_detector(t, torch.tensor([1, 0]), 4).tolist() == [4, 1]
    assert t.tolist() == [3, 1]


def test_cacc_and_asr_behind_a_detector_by_hand():
    # clean: 3 of 4 right; the detector rejects one correctly classified clean input -> CACC 2/4
    # poison: 3 of 4 hit the target; the detector rejects one of the hits -> ASR 2/4
    r = metrics.cacc_asr_behind_detector(
        clean_preds=[0, 1, 1, 0], clean_labels=[0, 1, 0, 0], clean_flags=[0, 1, 0, 0],
        poison_preds=[1, 1, 1, 0], poison_flags=[1, 0, 0, 0], target=1, num_classes=2)
    assert r == {"cacc": 0.5, "asr": 0.5}
    # without flags it reduces to plain CACC and ASR
    r0 = metrics.cacc_asr_behind_detector([0, 1, 1, 0], [0, 1, 0, 0], [0] * 4, [1, 1, 1, 0], [0] * 4, 1, 2)
    assert r0 == {"cacc": 0.75, "asr": 0.75}
    # rejecting a poisoned input that was *not* a hit changes nothing
    r1 = metrics.cacc_asr_behind_detector([0], [0], [0], [1, 1, 1, 0], [0, 0, 0, 1], 1, 2)
    assert r1["asr"] == 0.75


def test_behind_detector_bad_input():
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 2\)"):
        metrics.behind_detector([0, 2], [0, 1], num_classes=2)  # label 2 would read as "rejected"
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        metrics.behind_detector([0, 1], [0, 1], num_classes=0)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.behind_detector([0, 1], [0, 1, 1], num_classes=2)
    with pytest.raises(ValueError, match="flags must hold only 0/1"):
        metrics.behind_detector([0, 1], [0, 3], num_classes=2)

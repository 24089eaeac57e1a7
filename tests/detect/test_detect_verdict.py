"""The pool's verdict (verdict.py), duplicates counted once (duplicates.py) and the clean-set opt-out."""
import dataclasses

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

import dupfast
from dupfast.detection import Detector
from dupfast.detection.duplicates import group, input_keys
from dupfast.detection.verdict import MIN_POOL, betabinom_isf, betabinom_sf, decide

from detect_helpers import batches, make_samples


def _exact_sf(k, n, a, b):
    """P(K >= k) summed in 40-digit arithmetic (scipy's own sf loses digits below ~1e-8)."""
    mpmath.mp.dps = 40
    return float(mpmath.fsum(mpmath.binomial(n, j) * mpmath.beta(j + a, n - j + b) / mpmath.beta(a, b)
                             for j in range(k, n + 1)))


@pytest.mark.parametrize("n,a,b", [(10, 1, 5), (400, 1, 200), (400, 5, 196), (300, 2.5, 0.7)])
def test_betabinom_tail_matches_exact_sums(n, a, b):
    for k in (0, 1, 3, n // 10, n // 2, n):
        assert betabinom_sf(k, n, a, b) == pytest.approx(_exact_sf(k, n, a, b), rel=1e-9, abs=1e-300)
    k = betabinom_isf(0.05, n, a, b)
    assert stats.betabinom.sf(k, n, a, b) <= 0.05 < stats.betabinom.sf(k - 1, n, a, b)


def _pools(seed, n_val=200, n_pool=1821, shift=0.0, scale=1.0, n_poison=0, at=5.0):
    g = torch.Generator().manual_seed(seed)
    val = torch.randn(n_val, generator=g, dtype=torch.float64)
    clean = shift + scale * torch.randn(n_pool, generator=g, dtype=torch.float64)
    poison = at + torch.randn(n_poison, generator=g, dtype=torch.float64)
    return val, clean, poison


def test_clean_pools_get_no_poison_verdict_and_their_frr_on_a_shifted_pool():
    found, frrs = [], []
    for seed in range(100):
        val, clean, _ = _pools(seed, shift=0.4, scale=1.1)  # the pool's clean part differs from the clean set
        t_clean = float(np.percentile(val.numpy(), 95))
        v = decide(val, clean, 0.05, t_clean)
        found.append(v.poison_present)
        frrs.append(float((clean > v.threshold).double().mean()))
    assert np.mean(found) <= 0.12          # the test's level is 5%; the shift map's noise adds a few points
    assert 0.04 <= np.mean(frrs) <= 0.06   # the clean set's own threshold flags ~14% of these pools
    # a false alarm whose estimated mass reaches verdict.HEAVY falls back to the clean set's threshold, which flags
    # ~14% of this shifted pool: the one excursion the rule allows
    assert np.mean(np.array(frrs) > 0.10) <= 0.02 and max(frrs) <= 0.15


def test_separated_poison_is_found_and_heavy_poison_keeps_the_clean_threshold():
    val, clean, poison = _pools(0, n_poison=96)
    v = decide(val, torch.cat([clean, poison]), 0.05, float(np.percentile(val.numpy(), 95)))
    assert v.poison_present and v.p_value < 1e-3 and v.threshold_source == "pool"
    assert 0.02 < v.poison_share <= 96 / 1917 + 0.01
    assert float((poison > v.threshold).double().mean()) > 0.95
    val, clean, poison = _pools(1, n_poison=912)
    t_clean = float(np.percentile(val.numpy(), 95))
    v = decide(val, torch.cat([clean, poison]), 0.05, t_clean)
    assert v.poison_present and v.threshold_source == "clean" and v.threshold == t_clean


def test_a_tiny_pool_gets_no_decision_and_says_why():
    val, clean, _ = _pools(0, n_pool=MIN_POOL - 1)
    v = decide(val, clean, 0.05, 1.6)
    assert v.poison_present is None and v.p_value is None and v.threshold == 1.6
    assert f"only {MIN_POOL - 1} distinct inputs" in v.sentence()


def test_the_sentence_names_counts_and_expectation():
    val, clean, _ = _pools(3, n_pool=1000)
    v = decide(val, clean, 0.05, 1.6)
    v.n_flagged = int((clean > v.threshold).sum())
    assert v.sentence().startswith("no evidence of poison (p = ")
    assert f"{v.n_flagged:,} of 1,000 flagged, 50 expected at FRR 5%" in v.sentence()


def test_input_keys_ignore_padding_side_and_group_copies():
    ids = torch.tensor([[1, 5, 6, 0], [0, 1, 5, 6], [1, 5, 7, 0], [1, 5, 6, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    keys = input_keys(ids, mask)
    assert keys[0] == keys[1] == keys[3] and keys[0] != keys[2]
    g = group(keys)
    assert g.representative.tolist() == [0, 0, 2, 0] and g.unique.tolist() == [True, False, True, False]
    assert g.counts.tolist() == [3, 3, 1, 3] and g.n_unique == 2


@pytest.mark.parametrize("mode", ["default", "dup"])
def test_a_row_repeated_k_times_is_one_sample(bert, clean_and_pool, mode):
    clean, _, _ = clean_and_pool
    det = Detector(mode=mode).fit(bert, clean)
    base = make_samples(60, seed=31)
    once = det.score(bert, batches(base))
    copies = base + [base[7]] * 7  # 8 copies of row 7
    many = det.score(bert, batches(copies))
    assert torch.equal(many.scores[60:], many.scores[7].repeat(7)) and many.flags[60:].eq(many.flags[7]).all()
    assert many.copies[7] == 8 and many.verdict.n_unique == 60 and many.verdict.n_rows == 67
    # every pool statistic saw one sample: the distinct rows score as in the pool without the copies
    torch.testing.assert_close(many.scores[:60], once.scores, rtol=1e-9, atol=1e-9)
    assert many.threshold == pytest.approx(once.threshold, abs=1e-9)


def test_a_pool_of_one_input_repeated_gets_no_decision(bert, clean_and_pool):
    clean, _, _ = clean_and_pool
    res = dupfast.detect(bert, batches(make_samples(1, seed=5) * 48), clean=clean)
    assert res.poison_present is None and "only 1 distinct input in the pool" in res.summary
    assert len(set(res.scores.tolist())) == 1


def test_detect_without_a_clean_set_is_an_error_unless_pool_only(bert, clean_and_pool):
    _, pool, _ = clean_and_pool
    with pytest.raises(ValueError, match="needs a clean set .* pool_only=True"):
        dupfast.detect(bert, pool)
    res = dupfast.detect(bert, batches(make_samples(120, seed=8)), pool_only=True)
    assert res.poison_present is None and "UNCALIBRATED" in res.summary and not res.verdict.calibrated


def test_detect_reports_the_verdict_on_a_poisoned_pool(bert, clean_and_pool):
    clean, pool, y = clean_and_pool
    res = dupfast.detect(bert, pool, clean=clean)
    assert res.poison_present is True and res.p_value < 0.05
    assert res.summary.startswith("evidence of poison") and int(res.flags[y.bool()].sum()) >= 25


def test_purify_does_nothing_on_a_no_poison_verdict_unless_forced(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    res = dupfast.detect(bert, pool, clean=clean)
    res = dataclasses.replace(res, verdict=dataclasses.replace(res.verdict, poison_present=False, p_value=0.6))
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.warns(UserWarning, match=r"no evidence of poison.*pass force=True"):
        model, report = dupfast.purify(bert, pool, clean=clean, detection=res)
    assert report.stop_reason == "no evidence of poison"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fusion_rule(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    with pytest.raises(ValueError, match="fusion must be one of"):
        Detector(fusion="sometimes")
    auto = Detector().fit(bert, clean)
    fixed = Detector(fusion="fixed").fit(bert, clean)
    r_auto, r_fixed = auto.score(bert, pool), fixed.score(bert, pool)
    padded = list(fixed.scorer.weights) + [0.0] * (len(r_fixed.weights) - len(fixed.scorer.weights))
    assert list(r_fixed.weights) == pytest.approx(padded)
    # a half-poisoned pool: "auto" adapts (its estimated share is far above verdict.ADAPTIVE_SHARE)
    assert r_auto.verdict.poison_share >= 0.1 and list(r_auto.weights) != pytest.approx(padded)


def test_pool_only_on_a_tiny_pool_names_the_pool_not_a_clean_set(bert):
    with pytest.raises(ValueError, match=r"the pool's retained part \(\d+ of 24 rows, pool-only calibration\) is too "
                                         r"small"):
        dupfast.detect(bert, batches(make_samples(24, seed=9)), pool_only=True)


def test_load_model_is_public():
    from dupfast.harness.models import load_model
    assert dupfast.load_model is load_model

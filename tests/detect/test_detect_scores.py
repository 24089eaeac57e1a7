"""Score building blocks: z-normalisation, FRR threshold, excess weights, leave-one-out projection."""
import numpy as np
import pytest
import torch

from detect_helpers import batches, make_samples
from dupfast.detection import Detector
from dupfast.detection.calibration import ZNorm, excess_weights, frr_threshold
from dupfast.detection.stats import LayerStats, shrunk_covariance, whiteners
from dupfast.detection.transductive import loo_projections


def test_znorm_matches_numpy_population_std_and_floors_constant_columns():
    x = torch.randn(50, 3, dtype=torch.float64)
    x[:, 2] = 4.0
    z = ZNorm.fit(x)
    np.testing.assert_allclose(z.std[:2].numpy(), x[:, :2].numpy().std(0), rtol=1e-12)
    assert z.std[2] == 1.0  # DUP: std < 1e-6 -> 1
    m = ZNorm.from_moments(50, x.sum(0), (x ** 2).sum(0))
    np.testing.assert_allclose(m.std.numpy(), z.std.numpy(), rtol=1e-9)


def test_frr_threshold_is_numpy_percentile():
    s = torch.randn(37, dtype=torch.float64)
    assert frr_threshold(s, 0.05) == pytest.approx(np.percentile(s.numpy(), 95))
    with pytest.raises(ValueError, match="frr must lie in"):
        frr_threshold(s, 0.0)
    with pytest.raises(ValueError, match="no clean scores"):
        frr_threshold(torch.empty(0), 0.05)


def test_excess_weights_ignore_noise_and_follow_real_excess():
    val_rate = torch.full((4,), 0.05, dtype=torch.float64)
    # 1000 pool samples: column 2 has 40% above the clean threshold, the others sampling noise
    w = excess_weights(torch.tensor([52.0, 61.0, 400.0, 45.0]), 1000, val_rate, 500)
    assert w[2] == pytest.approx(1.0) and w.sum() == pytest.approx(1.0)
    assert excess_weights(torch.tensor([60.0, 55.0, 58.0, 49.0]), 1000, val_rate, 500).sum() == 0


def test_leave_one_out_projection_equals_explicit_whitened_dot_products():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(80, 2, 6, generator=g, dtype=torch.float64)
    pool = torch.randn(30, 2, 6, generator=g, dtype=torch.float64) + 0.5
    val = torch.randn(10, 2, 6, generator=g, dtype=torch.float64)
    st = LayerStats(2, 6).update(clean)
    mu, W = st.mean().unsqueeze(1), whiteners(shrunk_covariance(st.covariance()))
    q = torch.stack([(((pool[:, l] - mu[l, 0]) @ W[l]) ** 2).sum(1) for l in range(2)], 1)
    p_pool, p_val = loo_projections(pool, q, val, mu, W)
    for l in range(2):
        zp, zv = (pool[:, l] - mu[l, 0]) @ W[l], (val[:, l] - mu[l, 0]) @ W[l]
        for i in range(30):
            rest = torch.cat([zp[:i], zp[i + 1:]]).mean(0)
            assert p_pool[i, l].item() == pytest.approx((zp[i] @ rest).item(), rel=1e-9)
        torch.testing.assert_close(p_val[:, l], zv @ zp.mean(0))


def test_default_falls_back_to_fixed_weights_on_a_poison_free_pool(bert, clean_and_pool):
    clean, _, _ = clean_and_pool
    det = Detector(mode="default").fit(bert, clean)
    res = det.score(bert, batches(make_samples(80, seed=21)))
    # the fixed weights keep the clean set's threshold; the flags use the pool's own (verdict.py)
    assert res.verdict.clean_threshold == det.threshold
    assert res.verdict.threshold_source == "pool" and res.threshold == res.verdict.threshold
    fixed = list(det.scorer.weights) + [0.0] * (len(res.weights) - len(det.scorer.weights))
    assert list(res.weights) == pytest.approx(fixed)

"""The pool-only gap test of the verdict (verdict.gap_test): calibrated under an exponential tail, conservative
under a Gaussian one, and it finds a small cluster of inputs standing far above the pool's tail."""
import numpy as np
import torch

from dupfast.detection.verdict import GAP_MIN_CLUSTER, GAP_MIN_POOL, decide, gap_test


def _pools(kind, n_pools, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_pools):
        if kind == "exp":
            yield torch.empty(N, dtype=torch.float64).exponential_(generator=g)
        else:
            yield torch.randn(N, generator=g, dtype=torch.float64)


def test_false_alarms_at_the_level_under_an_exponential_tail_and_fewer_under_a_gaussian():
    # Rényi's spacings are exactly iid exponential under an exponential tail: the Bonferroni-corrected p-value is
    # then at most its level (a min over cluster sizes makes it conservative, not exact)
    p_exp = np.array([gap_test(x)[0] for x in _pools("exp", 400, 1000)])
    p_gauss = np.array([gap_test(x)[0] for x in _pools("gauss", 400, 1000, seed=1)])
    assert 0.005 <= (p_exp < 0.05).mean() <= 0.08
    assert (p_gauss < 0.05).mean() <= (p_exp < 0.05).mean() + 0.01


def test_a_cluster_far_above_the_tail_is_found_with_its_size():
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(1821, generator=g, dtype=torch.float64)
    for k in (GAP_MIN_CLUSTER, 18, 96):
        pool = torch.cat([clean, 9 + torch.randn(k, generator=g, dtype=torch.float64)])
        p, size = gap_test(pool)
        assert p < 1e-6 and size == k


def test_small_pools_and_small_clusters_are_not_tested():
    g = torch.Generator().manual_seed(4)
    assert gap_test(torch.randn(GAP_MIN_POOL - 1, generator=g, dtype=torch.float64)) == (1.0, 0)
    # a few odd inputs (fewer than GAP_MIN_CLUSTER) far above the rest are not a cluster this test reports
    pool = torch.cat([torch.randn(1000, generator=g, dtype=torch.float64), torch.full((3,), 20.0, dtype=torch.float64)])
    p, size = gap_test(pool)
    assert size != 3


def test_decide_finds_one_percent_poison_the_clean_set_alone_cannot_vouch_for():
    g = torch.Generator().manual_seed(5)
    clean_val = torch.randn(50, generator=g, dtype=torch.float64)         # a 100-row clean set's validation half
    pool_clean = torch.randn(1821, generator=g, dtype=torch.float64)
    pool = torch.cat([pool_clean, 8 + torch.randn(18, generator=g, dtype=torch.float64)])
    threshold = float(torch.quantile(clean_val, 0.95))
    v = decide(clean_val, pool, 0.05, threshold)
    assert v.poison_present is True and v.p_value < 0.05
    assert 18 / pool.numel() <= v.poison_share < 0.02 and v.poison_mass < 0.1  # no adaptive fusion at 1%
    # the FRR is kept on the pool's clean part: the 18 are trimmed before the 95th percentile is read
    assert abs(float((pool_clean > v.threshold).double().mean()) - 0.05) < 0.005
    # the same pool without the cluster: no evidence
    assert decide(clean_val, pool_clean, 0.05, threshold).poison_present is False

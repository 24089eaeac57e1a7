"""Per-sample scores from pooled layer features, z-normalisation, fusion and the FRR threshold.

The two heavy computations go through dupfast.ops (the kernel dispatch point): the multi-layer
Mahalanobis distance and the per-sample layer Gram (cosines + DUP's spectral concentration).
Convention: larger = more suspicious.
"""
import numpy as np
import torch

from .. import ops

STD_FLOOR = 1e-6  # DUP: a z-normaliser whose clean std is below this divides by 1 instead


def layer_distances(features, means, whiteners, layers=None, reduce="min", squared=False):
    """Mahalanobis distances [N, L'] ([N, L', K] for reduce='none') of features [N, L, d] to per-layer
    means [L, K, d] under whiteners [L, d, d]; K = 1 is DUP's class-agnostic Gaussian."""
    dev = features.device
    return ops.mahalanobis(features, means.to(dev, torch.float32), whiteners.to(dev, torch.float32),
                           layers=layers, reduce=reduce, squared=squared)


def transitions(features):
    """(gram [N, L, L], cosines [N, L-1], concentration [N]) from one per-sample layer Gram."""
    return ops.layer_transitions(features)


class ZNorm:
    """Per-column (x - mean) / std with the clean validation half's mean and population std (ddof 0,
    numpy's default, as DUP); a std below 1e-6 becomes 1 (as DUP)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.double(), std.double()

    @classmethod
    def fit(cls, scores: torch.Tensor) -> "ZNorm":
        s = scores.double()
        if s.shape[0] < 2:
            raise ValueError(f"z-normalisation needs at least 2 clean validation scores, got {s.shape[0]}")
        mean = s.mean(0)
        std = s.std(0, unbiased=False)
        return cls(mean, torch.where(std < STD_FLOOR, torch.ones_like(std), std))

    @classmethod
    def from_moments(cls, n, s1, s2) -> "ZNorm":
        """From count, Σx, Σx² (what an all_reduce of per-rank sums gives)."""
        n = float(n)
        if n < 2:
            raise ValueError(f"z-normalisation needs at least 2 clean validation scores, got {int(n)}")
        mean = s1.double() / n
        var = (s2.double() / n - mean ** 2).clamp_min(0)
        std = var.sqrt()
        return cls(mean, torch.where(std < STD_FLOOR, torch.ones_like(std), std))

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores.double() - self.mean.to(scores.device)) / self.std.to(scores.device)


def fuse(z: torch.Tensor, weights) -> torch.Tensor:
    """Weighted sum of z-normalised components z [N, m] -> [N]."""
    w = torch.as_tensor(weights, dtype=torch.float64, device=z.device)
    if w.shape != (z.shape[1],):
        raise ValueError(f"{z.shape[1]} score components but {w.numel()} weights")
    return z.double() @ w


def frr_threshold(clean_scores, frr: float) -> float:
    """The (1 - frr) percentile of clean scores (numpy's linear interpolation, as DUP's np.percentile)."""
    if not 0 < frr < 1:
        raise ValueError(f"frr must lie in (0, 1), got {frr}")
    s = np.asarray(clean_scores.detach().cpu() if isinstance(clean_scores, torch.Tensor) else clean_scores,
                   dtype=np.float64)
    if s.size == 0:
        raise ValueError("no clean scores to calibrate the threshold on")
    return float(np.percentile(s, 100 * (1 - frr)))


def select_top_k(values: torch.Tensor, k: int) -> list:
    """Indices of the k largest values, ties broken by the lower index (Python's stable sort, as DUP)."""
    order = sorted(range(values.numel()), key=lambda i: -float(values[i]))
    return sorted(order[:k])


def excess_weights(above: torch.Tensor, n_pool: float, val_rate: torch.Tensor, n_val: float,
                   alpha: float = 0.05) -> torch.Tensor:
    """Label-free column weights from the pool itself.

    above [m]: how many pool samples exceed each column's clean (1 - frr) percentile; n_pool: pool size;
    val_rate [m]: the share of the n_val clean validation samples above it (= frr up to ties).
    The excess (pool share - clean share) estimates, per column, the poisoned mass that column lifts over
    a clean threshold. Only the part beyond a Bonferroni-corrected significance floor (one-sided level
    `alpha` over the m columns, in standard errors of the difference) counts: on a poison-free pool every
    column's excess is sampling noise, and weighting columns by noise would pick exactly those where clean
    pool samples happen to score high, inflating the FRR. Returns weights summing to 1, or all zeros when
    no column shows a significant excess (the caller falls back to fixed weights)."""
    z_floor = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - alpha / above.numel())))
    rate = above.double() / float(n_pool)
    p = val_rate.double().clamp(1e-6, 1 - 1e-6)
    se = (p * (1 - p) * (1.0 / float(n_pool) + 1.0 / float(n_val))).sqrt()
    excess = (rate - val_rate.double() - z_floor * se).clamp_min(0)
    total = excess.sum()
    return excess / total if total > 0 else torch.zeros_like(excess)

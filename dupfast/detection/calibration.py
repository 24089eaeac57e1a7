"""Calibration on the clean set: the split, z-normalisation, fusion and the FRR threshold.

Protocol (DUP's): the clean set is shuffled with `seed` (2025) and cut; the first `fraction` (half) fits
the scorer's statistics, the rest (the validation half) z-normalises every score column and places the
threshold at the (1 - frr) percentile of the fused clean scores. Samples are identified by the loader's
`index` key when it has one (required under torch.distributed, so the halves do not depend on sharding),
by position otherwise. Every count and moment is all-reduced, so a sharded fit equals a single-process one.
"""
import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from .. import distributed as D
from .checks import check_ids

STD_FLOOR = 1e-6   # DUP: a z-normaliser whose clean std is below this divides by 1 instead
SMALL_HALF = 20    # fewer calibration or validation samples than this: warn (statistics and FRR unreliable)


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
        return cls(s.mean(0), _floored(s.std(0, unbiased=False)))

    @classmethod
    def from_moments(cls, n, s1, s2) -> "ZNorm":
        """From count, Σx, Σx² (what an all_reduce of per-rank sums gives)."""
        mean, std = moments(n, s1, s2)
        return cls(mean, _floored(std))

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores.double() - self.mean.to(scores.device)) / self.std.to(scores.device)


def moments(n, s1, s2):
    """(mean, population std) from count, Σx, Σx²."""
    n = float(n)
    if n < 2:
        raise ValueError(f"z-normalisation needs at least 2 clean validation scores, got {int(n)}")
    mean = s1.double() / n
    return mean, (s2.double() / n - mean ** 2).clamp_min(0).sqrt()


def _floored(std):
    return torch.where(std < STD_FLOOR, torch.ones_like(std), std)


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
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} of {s.size} clean scores are NaN or inf: no threshold")
    return float(np.percentile(s, 100 * (1 - frr)))


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


def split(n_local: int, index, seed: int, fraction: float):
    """(calibration rows, validation rows) of this rank: a seeded permutation of the global ids 0..N-1,
    its first `fraction` calibrates (DUP: random.seed(2025) shuffle, first half)."""
    if index is None:
        if D.is_sharded():
            raise ValueError("under torch.distributed the clean loader must yield an `index` key (global "
                             "sample ids), so the calibration/validation halves do not depend on sharding")
        index = torch.arange(n_local)
    index = torch.as_tensor(index).long()
    n = int(D.all_reduce_sum(torch.tensor(float(index.numel()), dtype=torch.float64)))
    if index.numel() and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"loader `index` values must be the sample ids 0..{n - 1}, got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    check_ids(index, "the clean set")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    in_cal = torch.zeros(n, dtype=torch.bool)
    in_cal[perm[: int(round(n * fraction))]] = True
    mine = in_cal[index]
    return torch.nonzero(mine).flatten(), torch.nonzero(~mine).flatten()


@dataclasses.dataclass
class Calibration:
    """What the clean validation half fixes."""
    frr: float
    znorm: ZNorm
    val_z: torch.Tensor        # [n_val, m] z-normalised validation columns (every rank's rows)
    threshold: float           # FRR threshold of the scorer's fixed weights
    val_feats: dict            # {pooling: [n_val, L, d]} validation features for the transductive projection
    info: dict = dataclasses.field(default_factory=dict)  # sample counts and source, reported

    def small_warning(self, dim: int) -> Optional[str]:
        n_cal, n_val = self.info.get("calibration_samples"), self.info.get("validation_samples")
        if n_cal is None or min(n_cal, n_val) >= SMALL_HALF:
            return None
        return (f"the clean set is too small for a {self.frr:.0%} FRR: {n_cal} calibration samples fit "
                f"{dim}-dimensional statistics and {n_val} validation scores place the threshold, so the FRR on "
                f"new clean data can be far from {self.frr:.0%}; use at least {SMALL_HALF} samples in each half")

    @property
    def rule(self) -> str:
        """The threshold rule (verdict.py): "auto" (the pool's clean bulk) or "clean" (the clean set's)."""
        return self.info.get("threshold_rule", "auto")

    @property
    def fusion_rule(self) -> str:
        """When mode="default" uses its pool-chosen weights: "auto", "adaptive" (always), "fixed" (never)."""
        return self.info.get("fusion", "auto")

    @property
    def calibrated(self) -> bool:
        """False when the detector calibrated on the pool itself (no clean set)."""
        return self.info.get("source") != "pool"

    def projection_z(self, scorer, pool: dict, weights=None):
        """pool: {pooling: (features [N, L, d], ‖z‖² [N, L])} of this rank -> z-normalised projection columns
        (pool [N, m_t], clean validation [n, m_t]); see transductive.py. weights [N]: each row's share of one
        sample (1 / its copies; None: 1 each)."""
        cols_pool, cols_val = scorer.projections(pool, self.val_feats, weights)
        zn = ZNorm.fit(cols_val)  # validation features are identical on every rank: no reduction needed
        return zn(cols_pool), zn(cols_val)

    def fusion(self, z: torch.Tensor, val_z: torch.Tensor, fixed_weights, adaptive: bool, distinct=None):
        """(weights [m], threshold) for the pool columns z [N, m] of this rank. Fixed scorers: their weights and
        the fitted threshold. Adaptive scorers (mode="default"): `excess_weights` from the whole pool (counts
        all-reduced over ranks, over the `distinct` rows only: copies count once), threshold re-placed on the
        clean validation scores fused with those weights, so the FRR guarantee is the same."""
        fixed = torch.tensor(fixed_weights, dtype=torch.float64)
        fixed = torch.cat([fixed, torch.zeros(z.shape[1] - fixed.numel(), dtype=torch.float64)])
        if not adaptive:
            return fixed, self.threshold
        # the fixed (DUP-recipe) combination competes as one more column, so a pool whose poison only the
        # combination lifts keeps it, and a column lifted by noise alone cannot outweigh it
        fv, fp = fuse(val_z, fixed), fuse(z, fixed)
        mu, sd = fv.mean(), fv.std(unbiased=False).clamp_min(1e-12)
        val_aug = torch.cat([val_z, ((fv - mu) / sd).unsqueeze(1)], 1)
        pool_aug = torch.cat([z, ((fp - mu) / sd).unsqueeze(1)], 1)
        tau = torch.quantile(val_aug, 1 - self.frr, dim=0)
        val_rate = (val_aug > tau).double().mean(0)
        if distinct is not None:
            pool_aug = pool_aug[distinct]
        above = D.all_reduce_sum((pool_aug > tau).double().sum(0))
        n = D.all_reduce_sum(torch.tensor(float(pool_aug.shape[0]), dtype=torch.float64))
        wa = excess_weights(above, n.item(), val_rate, val_z.shape[0])
        if wa.sum() == 0:
            return fixed, self.threshold
        w = wa[:-1] + wa[-1] * fixed / sd
        return w, frr_threshold(fuse(val_z, w), self.frr)


def calibrate(scorer, features: dict, labels, logits, index, num_classes: int, frr: float, seed: int,
              fraction: float, swap_halves: bool = False, name: str = "the clean set") -> Calibration:
    """Fit `scorer` on the calibration half of the clean features {pooling: [n, L, d]} and calibrate on
    the validation half. swap_halves: the validation half fits and vice versa (pool.py's cross-fitting)."""
    n_local = next(iter(features.values())).shape[0]
    cal, val = split(n_local, index, seed, fraction)
    if swap_halves:
        cal, val = val, cal
    n_cal = int(D.all_reduce_sum(torch.tensor(float(cal.numel()), dtype=torch.float64)))
    n_val = int(D.all_reduce_sum(torch.tensor(float(val.numel()), dtype=torch.float64)))
    need_val = max(2, math.ceil(1 / frr))
    if n_cal < 2 or n_val < need_val:
        raise ValueError(f"{name} is too small: {n_cal} calibration and {n_val} validation samples; "
                         f"need >= 2 and >= {need_val} (1/frr, to place the {1 - frr:.0%} percentile)")
    pick = lambda t, idx: None if t is None else t[idx]  # noqa: E731
    scorer.fit({k: v[cal] for k, v in features.items()}, pick(labels, cal), num_classes)
    cols = scorer.score({k: v[val] for k, v in features.items()}, pick(logits, val)).columns.double().cpu()
    # z-normalisers from every rank's validation columns, then the threshold on the fused clean scores
    n = D.all_reduce_sum(torch.tensor(float(cols.shape[0]), dtype=torch.float64))
    s1, s2 = D.all_reduce_sum(cols.sum(0)), D.all_reduce_sum((cols ** 2).sum(0))
    mean, std = moments(n, s1, s2)
    if not torch.isfinite(std).all():
        raise ValueError("the clean validation scores are not finite (NaN or inf)")
    if (std < STD_FLOOR).all():
        raise ValueError(f"every score column ({', '.join(scorer.component_names)}) is constant over the "
                         f"{n_val} clean validation samples: the model sees the clean texts as identical (empty "
                         "or repeated texts?), so nothing can be calibrated; give a real clean set")
    znorm = ZNorm(mean, _floored(std))
    val_z = D.all_gather_rows(znorm(cols))
    threshold = frr_threshold(fuse(val_z, scorer.weights), frr)
    # the transductive projection places validation samples on each pool's direction at score time
    val_feats = {p: _gather(features[p][val]) for p in scorer.projection_poolings}
    info = {"calibration_samples": n_cal, "validation_samples": n_val, "source": "clean"}
    return Calibration(frr, znorm, val_z, threshold, val_feats, info)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """[n_r, L, d] on each rank -> [n, L, d] everywhere (small: the clean validation half only)."""
    return D.all_gather_rows(x.detach().cpu().reshape(x.shape[0], -1)).reshape(-1, *x.shape[1:])

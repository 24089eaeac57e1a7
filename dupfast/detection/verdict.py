"""The pool's verdict: is there poison here at all, and where the threshold goes on this pool.

Users' pools are mostly or entirely clean, and their clean part is rarely distributed exactly like the
clean set (SST-2 dev vs test already doubled the FRR of the clean set's threshold). Both answers therefore
read the pool itself, with the clean set as the reference for the shape of clean scores:

Presence test (every mode). Under "no poison", the pool's distinct inputs and the clean validation half are
draws from one distribution up to the shift between the two sources. The shift is removed by an affine map
of clean scores onto the pool's bulk (least squares between the pool's and the clean set's 10th..60th
percentiles, where poison up to a third of the pool barely reaches). Then the number K_r of pool inputs
above the clean set's r-th largest (mapped) score is, exactly and for any score distribution,
BetaBinomial(N, r, n - r + 1) (the exceedance probability of an order statistic is Beta(r, n - r + 1)). The
p-value is the smallest tail probability over r in ORDER_STATS, Bonferroni-corrected. Its power is bounded
by the clean set: n validation scores cannot vouch for a tail thinner than about 1/n. So a second test reads
the pool alone (`gap_test`, pools of GAP_MIN_POOL or more distinct inputs): a few triggered inputs that score
far above every clean one stand apart from the pool's tail as a cluster. By Rényi's representation the
normalised spacings D_i = i (X_(i) - X_(i+1)) of the top scores are independent Exp(σ) under an exponential
tail, so a cluster of k inputs above the rest makes D_k / mean(D_k+1..m) ~ F(2, 2(m - k)) improbably large.
Lighter tails (Gaussian, chi) make the test conservative; it is tried for cluster sizes GAP_MIN_CLUSTER..m/2
(one or two odd clean inputs may stand apart), Bonferroni-corrected, and the two tests share ALPHA. It reads the
fused scores and, where the detector has one, the attention column on its own (`gap_columns`): a token trigger
stands far apart there even where the fused combination, which weights it at 15%, blurs the gap.

Threshold (threshold="auto"). The FRR is promised on the user's pool, so the threshold is the (1 - frr)
quantile of the pool's distinct inputs once the estimated poisoned share (K_1 beyond its null's 95th
percentile, 0 without evidence of poison) is trimmed from the top. A pool whose poisoned mass (that share, or the
excess above the mapped clean (1 - frr) percentile, whichever is larger) reaches HEAVY has
no trustworthy clean bulk: the clean set's threshold carries it (the papers' protocol), and the verdict is
"poison" when more than HEAVY + frr of the pool exceeds that threshold (its p-value then from the
unmapped count, K ~ BetaBinomial(N, r, n - r + 1) at the clean set's r-th largest). So does a pool of
fewer than MIN_POOL distinct inputs, for which no verdict is given. threshold="clean" keeps the clean set's
threshold always (DUP's rule: mode="dup" uses it).
"""
import dataclasses
import math
from typing import Optional

import torch

ALPHA = 0.05                      # the presence test's level
ORDER_STATS = (1, 2, 3, 5, 8, 13)  # clean order statistics (r-th largest) tried as tail cuts
BULK = (0.1, 0.6)                 # percentiles of the bulk the shift map is fitted on
# estimated poisoned share from which the clean set's threshold is used; also: a pool of which HEAVY + frr exceeds
# the clean threshold is "poison" (measured, fixed combination, SST-2 MiniLM BadNets / AddSent, 10 seeds: clean
# pools from another split reach 0.19 above it with 200 clean rows, papers' pools a third poisoned 0.26 or more;
# with 100 clean rows the two overlap, 0.36 vs 0.14: use 200 or more)
HEAVY = 0.20
GAP_MIN_POOL = 200                # the gap test needs this many distinct pool inputs (a tail of GAP_TOP of them)
GAP_TOP = 0.2                     # the share of the pool's top scores whose spacings the gap test reads
GAP_MIN_CLUSTER = 8               # smallest cluster tested (measured: SST-2 MiniLM, see docs/methods/verdict.md)
MIN_POOL = 20                     # fewer distinct pool inputs: no verdict
THRESHOLD_RULES = ("auto", "clean")
# adaptive fusion (mode="default": transductive projection, pool-chosen weights) only on pools estimated to hold
# at least this poisoned share: below it the pool-chosen weights follow the noise of the pool's clean part (SST-2
# BadNets MiniLM, 1% poison: AUROC 0.90-0.96 adaptive vs 0.997 fixed; at a third poisoned 1.000 vs 0.997)
ADAPTIVE_SHARE = 0.10


FUSION_RULES = ("auto", "adaptive", "fixed")


def check_fusion(rule) -> str:
    if rule not in FUSION_RULES:
        raise ValueError(f"fusion must be one of {FUSION_RULES}, got {rule!r}")
    return rule


def check_rule(rule) -> str:
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold must be one of {THRESHOLD_RULES}, got {rule!r}")
    return rule


@dataclasses.dataclass
class Verdict:
    """What the pool says. poison_present: True / False, or None when no decision is possible (`reason`)."""
    poison_present: Optional[bool]
    p_value: Optional[float]
    poison_share: float          # estimated share of poisoned distinct inputs (0 without evidence)
    threshold: float             # the threshold the flags use
    threshold_source: str        # "pool" (the pool's clean bulk), "clean" (the clean set's)
    clean_threshold: float       # the clean set's threshold, for comparison
    frr: float
    n_unique: int                # distinct pool inputs
    n_rows: int                  # pool rows, copies included
    n_flagged: int = 0           # flagged rows, copies included
    calibrated: bool = True      # False: no clean set (pool-only): the FRR is not calibrated
    poison_mass: float = 0.0     # the larger estimate (also the excess over the mapped clean threshold): gates the
                                 # adaptive fusion and the heavy rule
    reason: Optional[str] = None

    def sentence(self) -> str:
        """One line for every CLI run and report."""
        copies = f" ({self.n_rows - self.n_unique} duplicate rows counted once)" if self.n_rows > self.n_unique else ""
        expected = self.frr * self.n_rows
        tail = f"{self.n_flagged:,} of {self.n_rows:,} flagged, {expected:,.0f} expected at FRR {self.frr:.0%}{copies}"
        if self.poison_present is None:
            head = f"no decision on poison ({self.reason})"
        elif self.poison_present:
            head = (f"evidence of poison (p = {self.p_value:.2g}, about {self.poison_share:.1%} of distinct inputs "
                    "look poisoned)")
        else:
            head = f"no evidence of poison (p = {self.p_value:.2g})"
        note = "" if self.calibrated else "; UNCALIBRATED: no clean set, the FRR is an estimate from the pool itself"
        return f"{head}: {tail}{note}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sentence"] = self.sentence()
        return d


def betabinom_logpmf(n: int, a: float, b: float, start: int = 0) -> torch.Tensor:
    """log P(K = j) for j = start..n, K ~ BetaBinomial(n, a, b) (n up to millions)."""
    j = torch.arange(start, n + 1, dtype=torch.float64)
    lg = torch.lgamma
    n_ = torch.tensor(float(n), dtype=torch.float64)
    a_, b_ = torch.tensor(float(a), dtype=torch.float64), torch.tensor(float(b), dtype=torch.float64)
    return (lg(n_ + 1) - lg(j + 1) - lg(n_ - j + 1) + lg(j + a_) + lg(n_ - j + b_) - lg(n_ + a_ + b_)
            - (lg(a_) + lg(b_) - lg(a_ + b_)))


def betabinom_sf(k: int, n: int, a: float, b: float) -> float:
    """P(K >= k) for K ~ BetaBinomial(n, a, b), summed in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(torch.logsumexp(betabinom_logpmf(n, a, b, k), 0).exp().clamp(0, 1))


def betabinom_isf(q: float, n: int, a: float, b: float) -> int:
    """The smallest k with P(K > k) <= q: the null's upper (1 - q) quantile."""
    sf = torch.flip(torch.cumsum(torch.flip(betabinom_logpmf(n, a, b).exp(), [0]), 0), [0])  # P(K >= j)
    above = torch.nonzero(sf[1:] <= q).flatten()
    return int(above[0]) if above.numel() else n


def shift_map(clean: torch.Tensor, pool: torch.Tensor, share: float = 0.0):
    """(a, b) with a + b * clean's percentiles ~ pool's percentiles over the bulk (least squares); with an
    estimated poisoned share on top, the pool's q-th percentile of its clean part is its q (1 - share)-th."""
    q = torch.linspace(BULK[0], BULK[1], 13, dtype=torch.float64)
    x, y = torch.quantile(clean, q), torch.quantile(pool, q * (1 - share))
    spread = x[-1] - x[0]
    if spread <= 1e-12:
        return float(y.mean() - x.mean()), 1.0
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    b = min(max(b, 0.25), 4.0)  # a map that squashes or stretches beyond 4x is not a shift of the same scores
    return float(y.mean() - b * x.mean()), b


def tail_counts(clean: torch.Tensor, pool: torch.Tensor, a: float, b: float):
    """[(r, cut, K_r, p_r)] for each usable order statistic."""
    n, N = clean.numel(), pool.numel()
    top = torch.sort(clean, descending=True).values
    out = []
    for r in ORDER_STATS:
        if r > n // 2:
            break
        cut = a + b * float(top[r - 1])
        k = int((pool > cut).sum())
        out.append((r, cut, k, betabinom_sf(k, N, r, n - r + 1)))
    return out


def gap_test(pool: torch.Tensor):
    """(p-value, cluster size k) of the pool's top scores forming a cluster above its tail (module docstring);
    (1.0, 0) when the pool is too small."""
    N = pool.numel()
    if N < GAP_MIN_POOL:
        return 1.0, 0
    x = torch.sort(pool.double(), descending=True).values
    m = min(N - 1, int(math.ceil(GAP_TOP * N)))
    i = torch.arange(1, m + 1, dtype=torch.float64)
    d = i * (x[:m] - x[1:m + 1])                                   # normalised spacings D_1..D_m
    ks = torch.arange(GAP_MIN_CLUSTER, m // 2 + 1)
    if ks.numel() == 0:
        return 1.0, 0
    after = torch.flip(torch.cumsum(torch.flip(d, [0]), 0), [0])  # after[j] = D_j+1 + ... + D_m (0-based j)
    rest = after[ks] / (m - ks).double()                           # mean of D_k+1..D_m
    nu = (m - ks).double()
    t = d[ks - 1] / rest.clamp_min(1e-300)
    p = torch.exp(-nu * torch.log1p(t / nu))                       # P(F(2, 2 nu) > t) = (1 + t / nu)^-nu
    j = int(torch.argmin(p))
    return min(1.0, float(p[j]) * ks.numel()), int(ks[j])


def decide(clean_scores: torch.Tensor, pool_scores: torch.Tensor, frr: float, clean_threshold: float,
           rule: str = "auto", n_rows: Optional[int] = None, calibrated: bool = True, gap_columns=()) -> Verdict:
    """clean_scores [n]: fused scores of the clean validation half; pool_scores [N]: fused scores of the
    pool's distinct inputs (one per input, copies dropped); gap_columns: more [N] score columns of the same inputs
    the gap test also reads (Bonferroni over all). Returns the verdict and the threshold to flag at."""
    clean, pool = clean_scores.double().flatten().cpu(), pool_scores.double().flatten().cpu()
    N = pool.numel()
    base = dict(frr=frr, clean_threshold=clean_threshold, n_unique=N, n_rows=N if n_rows is None else n_rows,
                calibrated=calibrated)
    if N < MIN_POOL:
        why = (f"only {N} distinct input{'s' if N != 1 else ''} in the pool, fewer than {MIN_POOL}: too few to tell "
               "poison from clean; the clean set's threshold flags them")
        return Verdict(None, None, 0.0, clean_threshold, "clean", reason=why, **base)
    if clean.numel() < 2 * ORDER_STATS[0]:
        why = f"only {clean.numel()} clean validation scores: too few for a tail test"
        return Verdict(None, None, 0.0, clean_threshold, "clean", reason=why, **base)
    ab = shift_map(clean, pool)
    tails = tail_counts(clean, pool, *ab)
    gaps = [gap_test(x) for x in [pool, *(c.double().flatten().cpu() for c in gap_columns)]]
    p_gap, cluster = min(gaps)
    p_gap = min(1.0, p_gap * len(gaps))
    p_tail = len(tails) * min(t[3] for t in tails)
    p = min(1.0, 2 * min(p_tail, p_gap))  # the two tests share ALPHA
    present, share, mass = p < ALPHA, 0.0, 0.0
    # the cluster standing above the pool's tail (gap test): a share on its own, without the tail test's excess
    # estimate, which reads the clean set's (1 - frr) percentile and is noisy with a small clean set
    gap_share = cluster / N if 2 * p_gap < ALPHA else 0.0
    share = mass = gap_share
    for _ in range(3 if 2 * p_tail < ALPHA else 0):
        # poisoned share: the larger of (1) the inputs above the clean maximum beyond what clean data puts there
        # in 95% of pools (a lower bound, so a false alarm trims little of the clean tail) and (2) the excess above
        # the mapped clean (1 - frr) percentile (poison that only partly clears the clean tail, a style: StyleBkd
        # papers' pools were estimated at a few % by (1) alone); the bulk map is then refitted without it, since a
        # heavy poisoned share lifts the pool's percentiles the map reads
        cut = ab[0] + ab[1] * float(torch.quantile(clean, 1 - frr))
        excess = max(0.0, float((pool > cut).double().mean()) - frr) / (1 - frr)
        share = max((tails[0][2] - betabinom_isf(ALPHA, N, 1, clean.numel())) / N, gap_share, 0.0)
        mass = max(share, excess)
        ab = shift_map(clean, pool, min(mass, 0.5))
        tails = tail_counts(clean, pool, *ab)
    # a heavily poisoned pool has no clean bulk to read, whether or not the tail test saw it (the map it reads
    # is lifted by the poison too): so does a pool of which more than HEAVY + frr exceeds the clean threshold,
    # far beyond what a shift between sources did in the measurements (SST-2 dev -> test: 12%)
    above = int((pool > clean_threshold).sum())
    heavy = mass >= HEAVY or above >= (HEAVY + frr) * N  # mass >= share always
    if heavy:
        if not present:
            r = max(1, int(round(frr * clean.numel())))
            present, p = True, betabinom_sf(above, N, r, clean.numel() - r + 1)
        share = max(share, above / N - frr)
    mass = max(mass, share)
    if rule == "clean" or heavy:
        return Verdict(present, p, share, clean_threshold, "clean", poison_mass=mass, **base)
    # only the conservative share is trimmed: a false alarm must not pull the threshold into the clean tail
    kept = torch.sort(pool).values[: N - int(math.ceil(share * N))]
    threshold = float(torch.quantile(kept, 1 - frr)) if kept.numel() else clean_threshold
    return Verdict(present, p, share, threshold, "pool", poison_mass=mass, **base)

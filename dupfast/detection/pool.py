"""Pool-only fitting: calibrate on the unlabelled suspicious pool itself, for when no vetted clean set exists.

Fit on every sample, then repeatedly re-fit on the (1 - trim) least suspicious ones (class labels = the
model's own predictions) until the retained set stops changing. Every decision uses out-of-sample scores:
a Gaussian fitted on N ~ d samples scores its own samples far lower than new ones, which would make the
trimming lock onto whichever half it was fitted on. So each round fits twice with the calibration and
validation halves swapped (2-fold cross-fitting): samples of the calibration half take the swapped fit's
score, moved onto this fit's threshold scale. The detector keeps the final un-swapped fit; its threshold
is the (1 - frr) percentile of the retained validation half, so the FRR holds for samples that look clean
to the detector. Assumes the poisoned share is below `trim` (with more, the retained set can be the poison).
"""
import dataclasses

import torch

from .. import distributed as D
from .calibration import calibrate, split
from .checks import check_ids
from .scoring import assemble, score_batch
from .verdict import Verdict


@dataclasses.dataclass
class PoolFit:
    scorer: object        # the final (un-swapped) fitted scorer
    calibration: object   # its Calibration; .info says source="pool", trim, iterations, retained
    result: object        # the pool's DetectionResult with cross-fitted (out-of-sample) scores


def fit_pool(new_scorer, features: dict, logits, index, num_classes: int, frr: float, seed: int, fraction: float,
             trim: float, iterations: int) -> PoolFit:
    """new_scorer(): a fresh unfitted scorer (two per round). features {pooling: [N, L, d]} of this rank."""
    if logits is None:
        raise ValueError("pool calibration needs the model's logits (pseudo-labels for class statistics)")
    n_local = next(iter(features.values())).shape[0]
    if index is None:
        if D.is_sharded():
            raise ValueError("under torch.distributed the loader must yield an `index` key (global sample ids)")
        index = torch.arange(n_local)
    index = torch.as_tensor(index).long()
    check_ids(index, "the pool")
    labels = logits.argmax(-1)
    keep = torch.ones(n_local, dtype=torch.bool)
    for it in range(1, iterations + 1):
        sub = {k: v[keep] for k, v in features.items()}
        ids = _renumber(index[keep])
        fits = []
        for swap in (False, True):  # this round's fit, then the one with the halves swapped
            scorer = new_scorer()
            cal = calibrate(scorer, sub, labels[keep], logits[keep], ids, num_classes, frr, seed, fraction, swap,
                            name=f"the pool's retained part ({int(keep.sum())} of {n_local} rows, pool-only calibration)")
            fits.append((scorer, cal, assemble([score_batch(scorer, cal, features, logits, index)], scorer, cal)))
        (scorer, cal, result), (_, _, other) = fits
        # the clean-set rule on the retained half: the pool's own verdict would read its own trimmed tail
        t_this, t_other = result.verdict.clean_threshold, other.verdict.clean_threshold
        cal_rows = torch.nonzero(keep).flatten()[split(int(keep.sum()), ids, seed, fraction)[0]]
        result.scores[cal_rows] = other.scores[cal_rows] - t_other + t_this
        result.threshold = t_this
        result.flags = result.scores > result.threshold
        cut = torch.quantile(D.all_gather_rows(result.scores), 1 - trim).item()
        new_keep = result.scores <= cut
        changed = int(D.all_reduce_sum(torch.tensor(float((new_keep != keep).sum()), dtype=torch.float64)))
        keep = new_keep
        if changed == 0:
            break
    cal.info.update(source="pool", pool_trim=trim, iterations=it, threshold_rule="clean",
                    retained=int(D.all_reduce_sum(torch.tensor(float(keep.sum()), dtype=torch.float64))))
    n_rows = int(D.all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64)))
    result.verdict = Verdict(None, None, 0.0, result.threshold, "pool-only", result.threshold, frr, n_rows, n_rows,
                             int(D.all_reduce_sum(result.flags.double().sum())), calibrated=False,
                             reason="no clean set: the pool calibrated itself, so nothing tells its tail from "
                                    "clean data's")
    return PoolFit(scorer, cal, result)


def _renumber(ids: torch.Tensor) -> torch.Tensor:
    """Map this rank's subset of global ids to 0..M-1 over the subset of all ranks (order-preserving)."""
    every = torch.sort(D.all_gather_rows(ids)).values
    return torch.searchsorted(every, ids)

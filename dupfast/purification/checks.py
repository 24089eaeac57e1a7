"""Checks `purify` and `purify_generative` make around the long work, each called from one place:

    require_reiterable(...)     detection=None reads the pool and clean loaders twice: a one-shot iterator is an error
    require_clean_size(...)     enough clean rows for the stopping rule's held-out accuracy to mean something
    warn_flag_share(...)        nearly the whole pool flagged: a warning (the detector cannot separate poison here)
    check_teacher_logits(...)   the model as given computes finite logits on every row the objective reads
    check_student_logits(...)   the purified model still computes finite logits (raised inside the ModelGuard,
                                so the caller's model is restored as on any other failure)
"""
import collections.abc
import math
import warnings

import torch

from .. import distributed as dist

# more than this share of the pool flagged: the detector is not separating poison from clean inputs
NEARLY_ALL = 0.9
# the stopping rule's clean accuracy is measured on the held-out rows: at least this many expected there ...
MIN_HELDOUT_CLEAN = 2
# ... and never fewer clean rows than this in all (holdout_fraction 0: the training rows are read instead)
MIN_CLEAN_ROWS = 8
# rows of each held-out set the purified model is run on to check its logits
STUDENT_CHECK_ROWS = 64


class NearlyAllFlaggedWarning(UserWarning):
    """More than NEARLY_ALL of the pool is flagged."""


def require_reiterable(who: str, **loaders) -> None:
    """With detection=None the loaders are read twice (detection, then the rows): a one-shot iterator (a
    generator, iter(list), map(...)) would be empty on its second pass, which used to surface as "empty pool"."""
    for name, loader in loaders.items():
        if isinstance(loader, collections.abc.Iterator):
            raise ValueError(
                f"{who}(detection=None) runs the detection over the {name} loader and then reads it again, but "
                f"the {name} loader is a one-shot iterator ({type(loader).__name__}): its second pass would be "
                "empty. Pass a list of batches or a re-iterable loader (a torch DataLoader, a "
                "datasets.Dataset), or run the detection first and pass detection=")


def min_clean_rows(holdout_fraction: float) -> int:
    """The fewest clean rows whose held-out share (by token hash) is expected to hold MIN_HELDOUT_CLEAN rows."""
    if holdout_fraction <= 0:
        return MIN_CLEAN_ROWS
    return max(MIN_CLEAN_ROWS, math.ceil(MIN_HELDOUT_CLEAN / holdout_fraction - 1e-9))


def require_clean_size(n_clean: int, holdout_fraction: float) -> None:
    """n_clean: the clean rows over all ranks."""
    need = min_clean_rows(holdout_fraction)
    if n_clean < need:
        rows = (f"the held-out {holdout_fraction:.0%} of the clean set (rows chosen by token hash), about "
                f"{n_clean * holdout_fraction:.1f} row(s) here" if holdout_fraction > 0 else
                "the clean training rows themselves (holdout_fraction=0)")
        raise ValueError(
            f"purify needs at least {need} labelled clean rows, got {n_clean}: its stopping rule measures clean "
            f"accuracy on {rows}, and an accuracy over so few rows moves in steps of a whole row and cannot tell a "
            f"damaged model from a sound one. Give at least {need} clean rows (more is better: acc_tolerance is a "
            "share of them)")


def warn_flag_share(n_flag: int, n_pool: int, report, what: str = "inputs", stacklevel: int = 3) -> None:
    """Warn (and note in the report) when more than NEARLY_ALL of the pool is flagged."""
    if n_pool <= 0 or n_flag <= NEARLY_ALL * n_pool:
        return
    msg = (f"nearly everything flagged: {n_flag} of {n_pool} pool {what} ({n_flag / n_pool:.0%}): the detector "
           "cannot tell poison from clean here (a pool without poison, a detector fitted on another clean set, a "
           "threshold set too low), and unlearning the whole pool unlearns the task itself. Check the detection's "
           "scores and threshold, or pass flags you trust")
    warnings.warn(msg, NearlyAllFlaggedWarning, stacklevel=stacklevel + 1)
    report.warnings.append(msg)


def _nonfinite_rows(logits) -> tuple:
    """(rows with a NaN/inf logit, rows) of a [n, C] tensor (None or empty: (0, 0))."""
    if logits is None or logits.numel() == 0:
        return 0, 0 if logits is None else logits.shape[0]
    return int((~torch.isfinite(logits.float())).any(-1).sum()), logits.shape[0]


def check_teacher_logits(sets: dict) -> None:
    """sets: what the rows are ("flagged training") -> the teacher's [n, C] logits on them (None: not computed).
    Raises (on every rank) when any is NaN or inf: the ascent targets and the keep term would be NaN, and training
    would "succeed" on them."""
    names = list(sets)
    counts = dist.reduce_numbers([v for name in names for v in _nonfinite_rows(sets[name])])
    bad = [(name, int(counts[2 * i]), int(counts[2 * i + 1])) for i, name in enumerate(names) if counts[2 * i]]
    if bad:
        where = ", ".join(f"{k} of {n} rows ({name})" for name, k, n in bad)
        raise ValueError(
            f"the model's logits are NaN or inf on {where}, before any training: the model as given is broken or "
            "overflowed (NaN/inf weights, a bad checkpoint, float16 overflow). Purification needs its finite "
            "logits as the teacher; check torch.isfinite over the model's parameters and load it in float32. "
            "Nothing was changed")


@torch.no_grad()
def check_student_logits(model, data, pad_id, device) -> None:
    """The purified model on up to STUDENT_CHECK_ROWS of each held-out set: NaN or inf logits raise (on every
    rank), inside the ModelGuard, so the caller gets the model back as it was."""
    from .trainer import predict_rows

    k = n = 0
    for rows in (data.flag_hold, data.clean_hold):
        if len(rows):
            bad, total = _nonfinite_rows(predict_rows(model, rows.subset(range(min(len(rows), STUDENT_CHECK_ROWS))),
                                                      pad_id, device))
            k, n = k + bad, n + total
    k, n = (int(v) for v in dist.reduce_numbers([k, n]))
    if k:
        raise ValueError(
            f"after training, the purified model's logits are NaN or inf on {k} of {n} held-out rows checked: the "
            "training diverged (try a lower lr, a smaller lambda_asr or a kl_cap) or overflowed (float16: use a "
            "float32 model). The model was restored exactly as it was given")

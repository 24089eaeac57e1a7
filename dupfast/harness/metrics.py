"""The field's metrics (OpenBackdoor conventions). Positive class for detection = poisoned.

CACC = accuracy on clean test; ASR = fraction of triggered non-target inputs classified as the target;
FRR = clean inputs flagged; FAR = poisoned inputs not flagged; AUROC over scores (larger = more suspicious).
"""
import numbers

import numpy as np
import torch


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x, name: str) -> np.ndarray:
    """0/1 (or bool) vector as bool; anything else is a caller error, not something to coerce."""
    a = _np(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {a.shape}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or booleans), got values {np.unique(a)[:10].tolist()}")
    return a.astype(bool)


def _same_length(a, b, na: str, nb: str):
    if a.shape != b.shape:
        raise ValueError(f"{na} {a.shape} and {nb} {b.shape} differ in shape")
    if a.size == 0:
        raise ValueError(f"{na} is empty")


def accuracy(preds, labels) -> float:
    p, y = _np(preds), _np(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    if p.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((p == y).mean())


def cacc(preds, labels) -> float:
    """Clean accuracy."""
    return accuracy(preds, labels)


def asr(preds, target: int) -> float:
    """Attack success rate on a poisoned test set (every sample triggered, true label != target)."""
    p = _np(preds)
    if p.size == 0:
        raise ValueError("ASR of an empty poisoned set is undefined")
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise ValueError(f"target label must be an integer, got {target!r}")
    return float((p == target).mean())


def auroc(poison_labels, scores) -> float:
    from sklearn.metrics import roc_auc_score
    y, s = _binary(poison_labels, "poison labels").astype(int), _np(scores).astype(np.float64)
    _same_length(y, s, "poison labels", "scores")
    if len(np.unique(y)) < 2:
        raise ValueError("AUROC needs both clean (0) and poisoned (1) samples")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return float(roc_auc_score(y, s))


def detection_report(poison_labels, flags, scores=None) -> dict:
    """FRR, FAR, precision, recall, F1 (and AUROC when scores are given) of a detector's flags."""
    y, f = _binary(poison_labels, "poison labels"), _binary(flags, "flags")
    _same_length(y, f, "poison labels", "flags")
    tp, fp = int((f & y).sum()), int((f & ~y).sum())
    fn, tn = int((~f & y).sum()), int((~f & ~y).sum())
    out = {
        "frr": fp / (fp + tn) if fp + tn else float("nan"),
        "far": fn / (fn + tp) if fn + tp else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }
    p, r = out["precision"], out["recall"]
    out["f1"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    if scores is not None:
        out["auroc"] = auroc(y, scores)
    return out


def far_at_frr(poison_labels, scores, frr: float = 0.05) -> float:
    """FAR when the threshold is the (1 - frr) quantile of the clean scores in this same set (DUP's rule:
    flag iff score > tau, tau = np.percentile(clean, 100 (1 - frr)))."""
    y, s = _binary(poison_labels, "poison labels"), _np(scores).astype(np.float64)
    _same_length(y, s, "poison labels", "scores")
    if not 0 <= frr < 1:
        raise ValueError(f"frr must be in [0, 1), got {frr!r}")
    if y.all() or not y.any():
        raise ValueError("FAR at a fixed FRR needs both clean (0) and poisoned (1) samples")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    tau = np.quantile(s[~y], 1 - frr)
    return float((s[y] <= tau).mean())


def behind_detector(preds, flags, num_classes: int) -> np.ndarray:
    """OpenBackdoor rule: a flagged input gets the impossible label `num_classes`, so a rejected clean
    input counts as an error (lowers CACC) and a rejected poisoned one as not attacked (lowers ASR)."""
    p, f = _np(preds).copy(), _binary(flags, "flags")
    _same_length(p, f, "predictions", "flags")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        # the impossible label must not collide with a real prediction
        raise ValueError(f"predictions must lie in [0, {num_classes}), got range [{p.min()}, {p.max()}]")
    p[f] = num_classes
    return p


def cacc_asr_behind_detector(clean_preds, clean_labels, clean_flags, poison_preds, poison_flags,
                             target: int, num_classes: int) -> dict:
    """CACC and ASR of a model guarded by a detector (OpenBackdoor's test-detect evaluation): flagged
    inputs are rejected, i.e. given the impossible label `num_classes`, before scoring."""
    return {
        "cacc": cacc(behind_detector(clean_preds, clean_flags, num_classes), clean_labels),
        "asr": asr(behind_detector(poison_preds, poison_flags, num_classes), target),
    }

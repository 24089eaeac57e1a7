"""The field's metrics (OpenBackdoor conventions). Positive class for detection = poisoned.

CACC = accuracy on clean test; ASR = fraction of triggered non-target inputs classified as the target;
FRR = clean inputs flagged; FAR = poisoned inputs not flagged; AUROC over scores (larger = more suspicious).
"""
import numpy as np
import torch


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


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
    return float((p == target).mean())


def auroc(poison_labels, scores) -> float:
    from sklearn.metrics import roc_auc_score
    y, s = _np(poison_labels).astype(int), _np(scores).astype(np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("AUROC needs both clean (0) and poisoned (1) samples")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return float(roc_auc_score(y, s))


def detection_report(poison_labels, flags, scores=None) -> dict:
    """FRR, FAR, precision, recall, F1 (and AUROC when scores are given) of a detector's flags."""
    y, f = _np(poison_labels).astype(bool), _np(flags).astype(bool)
    if y.shape != f.shape:
        raise ValueError(f"poison labels {y.shape} and flags {f.shape} differ in shape")
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
    """FAR when the threshold is the (1 - frr) quantile of the clean scores in this same set."""
    y, s = _np(poison_labels).astype(bool), _np(scores).astype(np.float64)
    tau = np.quantile(s[~y], 1 - frr)
    return float((s[y] <= tau).mean())


def behind_detector(preds, flags, num_classes: int) -> np.ndarray:
    """OpenBackdoor rule: a flagged input gets the impossible label `num_classes`, so a rejected clean
    input counts as an error (lowers CACC) and a rejected poisoned one as not attacked (lowers ASR)."""
    p, f = _np(preds).copy(), _np(flags).astype(bool)
    p[f] = num_classes
    return p

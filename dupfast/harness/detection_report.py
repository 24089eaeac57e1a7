"""Detection report: JSON metrics, and PNGs of the clean vs poisoned score histograms and the ROC curve.

Plots use matplotlib's Agg backend (no display). Ground-truth poison labels, when given, are used only
here, for evaluation, never by the detector. A metric the labels cannot support (AUROC when every sample
is clean, anything when the labels are not 0/1) is left out of the report with a note saying why; the
scores themselves never depend on it.
"""
import json
import math
import pathlib

import numpy as np

from . import metrics


def summarize(result, poison_labels=None, frr: float = 0.05) -> dict:
    """Counts and threshold; with ground truth also AUROC, FAR/FRR at the calibrated threshold, and
    FAR at the oracle threshold that gives exactly `frr` on this pool's clean samples."""
    scores = result.scores.numpy()
    flags = result.flags.numpy()
    out = {"samples": int(scores.size), "flagged": int(flags.sum()), "threshold": float(result.threshold),
           "selected_layers": list(result.selected_layers), "components": list(result.component_names)}
    if getattr(result, "verdict", None) is not None:
        out["verdict"] = result.verdict.as_dict()
    if poison_labels is None:
        return out
    y = np.asarray(poison_labels)
    if y.shape != scores.shape:
        raise ValueError(f"{y.size} poison labels for {scores.size} scores")
    notes = []
    odd = sorted(set(np.unique(y).tolist()) - {0, 1})
    if odd:
        notes.append(f"poison_label must be 0 (clean) or 1 (poisoned), found {odd[:5]}: no detection metrics")
    else:
        y = y.astype(bool)
        both = bool(y.any() and not y.all())
        rep = metrics.detection_report(y, flags, scores if both else None)
        out.update({k: v for k, v in rep.items() if not (isinstance(v, float) and math.isnan(v))})
        if both:
            out[f"far_at_frr{frr:g}"] = metrics.far_at_frr(y, scores, frr)
        else:
            value, missing, lacking = (1, "FRR", "clean") if y.all() else (0, "FAR, recall", "poisoned")
            notes.append(f"every poison_label is {value}: AUROC, {missing}, FAR at FRR {frr:g} and the ROC plot "
                         f"need {lacking} samples too, so they are absent")
    if notes:
        out["notes"] = notes
    return out


def roc_curve(poison_labels, scores):
    from sklearn.metrics import roc_curve as sk_roc
    fpr, tpr, _ = sk_roc(np.asarray(poison_labels).astype(int), np.asarray(scores, dtype=np.float64))
    return fpr, tpr


def plot_histograms(path, scores, poison_labels, threshold=None, title="detection scores"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(poison_labels).astype(bool)
    bins = np.histogram_bin_edges(s, bins="doane")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(s[~y], bins=bins, alpha=0.7, label=f"clean ({int((~y).sum())})", color="#0072B2")
    ax.hist(s[y], bins=bins, alpha=0.7, label=f"poisoned ({int(y.sum())})", color="#D55E00")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("score (larger = more suspicious)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(path, curves: dict, title="ROC"):
    """curves: name -> (poison_labels, scores)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {metrics.auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("FRR (clean flagged)")
    ax.set_ylabel("1 - FAR (poisoned flagged)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir, result, poison_labels=None, name="detect", extra: dict = None, frr: float = 0.05) -> dict:
    """Write <name>.json (+ <name>_hist.png, and <name>_roc.png when the labels hold both classes)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result, poison_labels, frr)
    if extra:
        summary.update(extra)
    if poison_labels is not None and set(np.unique(np.asarray(poison_labels)).tolist()) <= {0, 1}:
        summary["plots"] = [f"{name}_hist.png"]
        plot_histograms(out / f"{name}_hist.png", result.scores.numpy(), poison_labels, result.threshold, name)
        if "auroc" in summary:
            plot_roc(out / f"{name}_roc.png", {name: (poison_labels, result.scores.numpy())}, name)
            summary["plots"].append(f"{name}_roc.png")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary

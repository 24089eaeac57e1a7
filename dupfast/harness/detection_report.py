"""Detection report: JSON metrics, and PNGs of the score histogram (clean vs poisoned with ground truth, else kept
vs flagged) and the ROC curve.

Plots use matplotlib's Agg backend (no display; `pyplot()` imports it when a plot is drawn). Ground-truth poison
labels, when given, are used only here, for evaluation, never by the detector. A metric the labels cannot support
(AUROC when every sample is clean, anything when the labels are not 0/1) is left out of the report with a note
saying why; the scores themselves never depend on it.
"""
import json
import math
import pathlib

import numpy as np

from . import metrics


def summarize(result, poison_labels=None, frr: float = 0.05) -> dict:
    """Counts (flagged, kept, duplicates: rows repeating an earlier row's input, counted once by the verdict) and
    threshold; with ground truth also AUROC, FAR/FRR at the calibrated threshold, and
    FAR at the oracle threshold that gives exactly `frr` on this pool's clean samples."""
    scores = result.scores.numpy()
    flags = result.flags.numpy()
    out = {"samples": int(scores.size), "flagged": int(flags.sum()), "kept": int(scores.size - flags.sum()),
           "threshold": float(result.threshold),
           "selected_layers": list(result.selected_layers), "components": list(result.component_names)}
    if getattr(result, "verdict", None) is not None:
        out["verdict"] = result.verdict.as_dict()
        out["duplicates"] = result.verdict.n_rows - result.verdict.n_unique  # rows repeating an earlier input
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


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when a plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def has_both_classes(poison_labels) -> bool:
    """Ground truth that can be plotted and scored: 0/1 labels holding both classes."""
    if poison_labels is None:
        return False
    y = np.asarray(poison_labels)
    return set(np.unique(y).tolist()) == {0, 1}


def plot_histograms(path, scores, poison_labels=None, threshold=None, title="detection scores", flags=None):
    """Score histogram with the threshold: clean vs poisoned rows (0/1 `poison_labels`, ground truth), else kept vs
    flagged rows stacked (`flags`), else all rows."""
    plt = pyplot()
    s = np.asarray(scores, dtype=np.float64)
    bins = np.histogram_bin_edges(s, bins="doane")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if poison_labels is not None:
        y = np.asarray(poison_labels).astype(bool)
        ax.hist(s[~y], bins=bins, alpha=0.7, label=f"clean ({int((~y).sum())})", color="#0072B2")
        ax.hist(s[y], bins=bins, alpha=0.7, label=f"poisoned ({int(y.sum())})", color="#D55E00")
    elif flags is not None:
        f = np.asarray(flags, dtype=bool)
        ax.hist([s[~f], s[f]], bins=bins, stacked=True, color=["#0072B2", "#D55E00"],
                label=[f"kept ({int((~f).sum())})", f"flagged ({int(f.sum())})"])
    else:
        ax.hist(s, bins=bins, color="#0072B2", label=f"rows ({s.size})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("score (larger = more suspicious)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def plot_roc(path, curves: dict, title="ROC"):
    """curves: name -> (poison_labels, scores)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {metrics.auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("FRR (clean flagged)")
    ax.set_ylabel("1 - FAR (poisoned flagged)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def write_plots(out_dir, name, scores, flags, poison_labels, threshold, summary) -> list:
    """<name>_hist.png always (clean vs poisoned with ground truth of both classes, else kept vs flagged), and
    <name>_roc.png when `summary` (summarize's) holds an AUROC. Returns the file names written."""
    out = pathlib.Path(out_dir)
    truth = poison_labels if has_both_classes(poison_labels) else None
    plot_histograms(out / f"{name}_hist.png", scores, truth, threshold, f"dupfast {name}", flags=flags)
    plots = [f"{name}_hist.png"]
    if "auroc" in summary:
        plot_roc(out / f"{name}_roc.png", {name: (poison_labels, scores)}, f"dupfast {name}")
        plots.append(f"{name}_roc.png")
    return plots


def write_report(out_dir, result, poison_labels=None, name="detect", extra: dict = None, frr: float = 0.05) -> dict:
    """Write <name>.json, <name>_hist.png, and <name>_roc.png when the labels hold both classes."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result, poison_labels, frr)
    if extra:
        summary.update(extra)
    summary["plots"] = write_plots(out, name, result.scores.numpy(), result.flags.numpy(), poison_labels,
                                   result.threshold, summary)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary

"""The demo's human-readable report: a summary table (victim, detection, purification), PNGs of the detector's
ROC curve and clean vs triggered score histograms, the purification trajectory, all in one Markdown file
beside the JSON.

    <stem>.md                   summary table, the figures, the trajectory table, a link to <stem>.json
    <stem>_detect_roc.png       ROC of the detector on the suspicious pool (ground truth used only here)
    <stem>_detect_hist.png      score histograms, clean vs triggered pool inputs, with the threshold
    <stem>_purify.png           held-out numbers per purification evaluation + the test-set numbers before/after

The ASR floor (the share of CLEAN non-target test inputs the model already predicts as the target) is shown
beside every ASR: an ASR at its floor means the trigger no longer adds anything; the distance to the floor is
what is left of the backdoor.
"""
import math
import pathlib

import numpy as np

from . import detection_report

FLOOR_NOTE = ("ASR floor: the share of clean non-target test inputs the model already predicts as the target "
              "(the ASR a model without a backdoor but with these errors would show); "
              "ASR - floor is what is left of the backdoor.")
DATA_NAMES = {"rotten-tomatoes": "Rotten Tomatoes", "bbc-news": "BBC News", "sms-spam": "SMS Spam",
              "sst-2": "SST-2 (the DUP release's poisoned files)"}
COLUMNS = ("step", "CACC", "ASR", "ASR floor", "ASR - floor", "AUROC", "FRR", "FAR", "flagged", "seconds")


def fmt(x, digits=4) -> str:
    """A number for a table: `digits` decimals, '-' when absent or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def summary_rows(report: dict) -> list[list[str]]:
    """One row per step present: the victim (backdoored), the detection, the purified model."""
    steps, rows = report.get("steps", {}), []
    v = steps.get("victim")
    if v:
        rows.append([f"victim ({'cached' if v.get('cached') else 'trained'})", fmt(v["cacc"]), fmt(v["asr"]),
                     fmt(v.get("asr_floor")), fmt(v["asr"] - v["asr_floor"]) if "asr_floor" in v else "-",
                     "-", "-", "-", "-", fmt(v.get("seconds"), 1)])
    d = steps.get("detect")
    if d:
        rows.append(["detection", "-", "-", "-", "-", fmt(d["auroc"]), fmt(d["frr"], 3), fmt(d["far"], 3),
                     f"{d['flagged']}/{d['pool_size']} ({d['pool_poisoned']} triggered)", fmt(d.get("seconds"), 1)])
    p = steps.get("purify")
    if p:
        rows.append([f"purified ({p.get('steps_run')} steps)", fmt(p["cacc_after"]), fmt(p["asr_after"]),
                     fmt(p.get("asr_floor_after")),
                     fmt(p["asr_after"] - p["asr_floor_after"]) if "asr_floor_after" in p else "-",
                     "-", "-", "-", "-", fmt(p.get("seconds"), 1)])
    return rows


def text_table(rows, columns=COLUMNS) -> str:
    """Fixed-width table for the terminal."""
    table = [list(columns), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(table[0]), "  ".join("-" * w for w in widths), *map(line, table[1:])])


def markdown_table(rows, columns=COLUMNS, left: int = 1) -> str:
    """A Markdown table: the first `left` columns (names, words) left-aligned, the rest (numbers) right-aligned."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(columns) - left)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot_trajectory(path, history: list, victim: dict = None, purified: dict = None, selected: dict = None,
                    agree_bound: float = None, acc_floor: float = None, title="purification trajectory",
                    acc_key: str = "acc", acc_label: str = "held-out clean accuracy",
                    agree_label: str = "held-out flagged: agreement with victim (ASR proxy)"):
    """Held-out flagged agreement with the victim (the defender's ASR proxy) and held-out clean accuracy (the
    entries' `acc_key`) per evaluation; the test-set CACC, ASR and ASR floor of the victim (step 0) and of the kept
    model (the selected step) as markers, when given: those are measured only there."""
    plt = detection_report.pyplot()

    step = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(step, [h["agree"] for h in history], "-o", ms=3, color="#D55E00", label=agree_label)
    ax.plot(step, [h[acc_key] for h in history], "-o", ms=3, color="#0072B2", label=acc_label)
    if agree_bound is not None:
        ax.axhline(agree_bound, color="#D55E00", ls=":", lw=1, label=f"agreement bound {agree_bound:g}")
    if acc_floor is not None:
        ax.axhline(acc_floor, color="#0072B2", ls=":", lw=1, label=f"admissible accuracy {acc_floor:.3f}")
    kept = selected["step"] if selected else (step[-1] if step else 0)
    if selected:
        ax.axvline(kept, color="k", ls="--", lw=1, label=f"kept state (step {kept})")
    for x, m, marker in ((0, victim, "s"), (kept, purified, "D")):
        if not m:
            continue
        ax.scatter([x], [m["asr"]], marker=marker, s=50, color="#CC79A7", zorder=3)
        ax.scatter([x], [m["cacc"]], marker=marker, s=50, color="#009E73", zorder=3)
        if m.get("asr_floor") is not None:
            ax.scatter([x], [m["asr_floor"]], marker=marker, s=110, facecolors="none", edgecolors="#555555",
                       linewidths=1.5, zorder=4)
    if victim or purified:  # one legend entry per test metric (square = victim, diamond = kept model)
        ax.scatter([], [], marker="s", color="#CC79A7", label="test ASR (square: victim, diamond: purified)")
        ax.scatter([], [], marker="s", color="#009E73", label="test CACC")
        ax.scatter([], [], marker="s", facecolors="none", edgecolors="#555555", label="test ASR floor")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("purification step")
    ax.set_ylabel("fraction")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    detection_report.save_figure(fig, path)


# the trajectory table's columns after the step: (header, history key, decimals)
TRAJECTORY_COLUMNS = (("epoch", "epoch", 2), ("held-out flagged agreement", "agree", 4),
                      ("held-out clean acc", "acc", 4))


def trajectory_table(history, selected, columns=TRAJECTORY_COLUMNS) -> str:
    """One row per evaluation: the step, `columns`, whether it was admissible, and the kept one in bold."""
    cols = ("step", *(c[0] for c in columns), "admissible", "kept")
    rows = [[str(h["step"]), *(fmt(h.get(key), digits) for _, key, digits in columns),
             "yes" if h.get("admissible", True) else "no",
             "**kept**" if selected and h["step"] == selected.get("step") else ""] for h in history]
    return markdown_table(rows, cols)


def write(report: dict, json_path, scores=None, poison_labels=None, threshold=None) -> dict:
    """Write <stem>.md and the PNGs next to the JSON report at `json_path`. `scores`/`poison_labels`: the
    detector's pool scores and the pool's ground truth (for the ROC and histograms). Returns name -> path."""
    json_path = pathlib.Path(json_path)
    out, stem = json_path.parent, json_path.stem
    out.mkdir(parents=True, exist_ok=True)
    steps, files = report.get("steps", {}), {}
    v, d, p = steps.get("victim"), steps.get("detect"), steps.get("purify")
    md = ["# dupfast demo report", ""]
    s = report.get("settings", {})
    po = steps.get("poison", {})
    if s:
        md += [f"Model `{s.get('model')}` on {DATA_NAMES.get(s.get('data'), s.get('data') or 'Rotten Tomatoes')}, {s.get('setting')}-label {s.get('attack')} at rate "
               f"{s.get('rate')} (target label {s.get('target')}); {po.get('train_size', s.get('train_size'))} "
               f"training rows ({po.get('train_poisoned', '?')} poisoned), {po.get('test_clean_size', '?')} clean "
               f"and {po.get('test_poison_size', '?')} triggered test inputs. Total {report.get('total_seconds')} s "
               f"(torch threads: {report.get('torch_threads')}).", ""]
    md += ["## Summary", "", markdown_table(summary_rows(report)), "", FLOOR_NOTE, ""]
    if p:
        md += [f"Purification stop: {p.get('stop_reason')}.", ""]
    y = None if poison_labels is None else np.asarray(poison_labels).astype(int)
    if d and scores is not None and y is not None and y.size:
        sc = np.asarray(scores, dtype=np.float64)
        md += ["## Detection", "",
               f"Pool of {d['pool_size']} inputs ({d['pool_poisoned']} triggered), calibrated on {d['clean_size']} "
               f"clean ones; {d['flagged']} flagged at threshold {d['threshold']:.4g}. Precision "
               f"{fmt(d.get('precision'), 3)}, recall {fmt(d.get('recall'), 3)}.", ""]
        if 0 < y.sum() < y.size:
            files["roc"] = out / f"{stem}_detect_roc.png"
            detection_report.plot_roc(files["roc"], {"detector": (y, sc)}, "detection ROC (suspicious pool)")
            md += [f"![ROC]({files['roc'].name})", ""]
        files["hist"] = out / f"{stem}_detect_hist.png"
        detection_report.plot_histograms(files["hist"], sc, y, threshold, "detection scores: clean vs triggered")
        md += [f"![score histograms]({files['hist'].name})", ""]
    if p and p.get("history"):
        cfg = p.get("config") or {}
        teacher = p.get("teacher") or {}
        acc0 = teacher.get("heldout_clean_acc")
        tol = cfg.get("acc_tolerance")
        files["trajectory"] = out / f"{stem}_purify.png"
        plot_trajectory(files["trajectory"], p["history"],
                        victim={"asr": v["asr"], "cacc": v["cacc"], "asr_floor": v.get("asr_floor")} if v else None,
                        purified={"asr": p["asr_after"], "cacc": p["cacc_after"],
                                  "asr_floor": p.get("asr_floor_after")},
                        selected=p.get("selected"), agree_bound=cfg.get("agree_bound"),
                        acc_floor=acc0 - tol if acc0 is not None and tol is not None and not math.isnan(acc0) else None)
        md += ["## Purification", "",
               "Per evaluation, what the defender can measure: the held-out flagged rows' agreement with the "
               "victim's label (the ASR proxy the stopping rule uses) and the held-out clean accuracy. The test-set "
               "ASR, CACC and ASR floor are measured only on the victim (step 0) and on the kept model.", "",
               f"![purification trajectory]({files['trajectory'].name})", "",
               trajectory_table(p["history"], p.get("selected")), ""]
    md += [f"All numbers: [`{json_path.name}`]({json_path.name}).", ""]
    files["markdown"] = out / f"{stem}.md"
    files["markdown"].write_text("\n".join(md))
    return files

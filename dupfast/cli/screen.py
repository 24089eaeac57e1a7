"""`dupfast screen`: find the poisoned rows of a training set in one command.

    dupfast screen DATA --clean CLEAN --out DIR [--model FINETUNED | --base minilm] [--label-map neg=0,pos=1]

DUP reads a backdoor from a model that learned it, so screening a data set needs a classifier fine-tuned on
it. --model: the user's classifier fine-tuned on DATA, used as it is. Otherwise --base (a short name of
dupfast.harness.models, default minilm, or a local HF folder) is fine-tuned on DATA first (DATA then needs
labels), saved to DIR/model, and its accuracy on CLEAN checked: a model at chance (within 5 points of the
majority-class rate) stops the run with the fix, since its scores would mean nothing. Then the rows of DATA are
scored with CLEAN as the clean set, and DIR gets:
    kept.csv, flagged.csv  every original column of DATA, plus row_id (0-based row of DATA), score, flag; the two
                           files partition DATA (`dupfast purify --flags DIR/flagged.csv` reads either)
    report.md              the verdict, counts, score histogram, trigger candidates (words over-represented in
                           flagged rows), and the ROC when DATA has a poison_label column (evaluation data)
    screen.json, screen_hist.png[, screen_roc.png], detector/ (reusable: `dupfast purify --detector`)
Labels that are not integers are mapped through the model's config.label2id, or --label-map; anything else is
an error before any work. Files are read as `dupfast detect` reads them (dupfast.tables).
"""
import collections
import csv
import dataclasses
import json
import math
import pathlib
import re
import sys
from typing import Optional

from .argtypes import add_progress_flags, info, positive_int, synopsis, with_bar
from .detect import DEFAULT_FRR, _fraction

OUTPUTS = ("kept.csv", "flagged.csv", "report.md", "screen.json", "screen_hist.png", "screen_roc.png", "model",
           "detector")
OWN_COLUMNS = ("row_id", "score", "flag")
DEFAULT_BASE = "minilm"
# fine-tuning recipe for ~1-10k rows (the demo's MiniLM recipe, lr 1e-4, batch 8-16, learns SST-2 and AG News in
# 2 epochs; a third epoch helps the smaller sets); flags so that --model with any of them is an error
TUNING = {"epochs": 3, "lr": 1e-4, "batch_size": 16, "seed": 2025}
CHANCE_MARGIN = 0.05   # accuracy within this of the majority-class rate is "at chance"
DETECT_BATCH = 32
WORD = re.compile(r"\w+")


@dataclasses.dataclass
class Data:
    """A table with every original column (`header`, `records`) and the columns dupfast reads from it."""
    path: pathlib.Path
    header: list
    records: list               # [{column: raw value}], the file's rows in order
    texts: list
    labels: Optional[list]      # raw values (strings allowed: mapped later)
    poison: Optional[list]
    label_column: Optional[str]


def read_data(path, text_column=None, label_column=None, need_labels=False, role="this file") -> Data:
    """`dupfast.tables.read_table` keeping every column and the labels as written (maybe strings)."""
    from ..tables import read_table

    t = read_table(path, text_column, label_column, need_labels, role, raw_labels=True, keep_records=True)
    return Data(t.path, t.header, t.records, t.texts, t.labels, t.poison_labels, t.label_column)


# ---- labels -----------------------------------------------------------------------------------------------

def parse_label_map(text: str) -> dict:
    """'neg=0,pos=1' -> {'neg': 0, 'pos': 1}."""
    out = {}
    for part in (p for p in text.split(",") if p.strip()):
        name, sep, value = part.rpartition("=")
        name = name.strip()
        if not sep or not name or not value.strip().isdigit():
            raise ValueError(f"--label-map takes NAME=ID pairs separated by commas, e.g. negative=0,positive=1; "
                             f"got {part!r}")
        if name in out:
            raise ValueError(f"--label-map names {name!r} twice: give each label one class id")
        out[name] = int(value)
    if not out:
        raise ValueError("--label-map is empty: give NAME=ID pairs, e.g. negative=0,positive=1")
    return out


def _integer(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def label_ids(data: Data, names: dict, source: str, num_labels: Optional[int]) -> list:
    """DATA's / CLEAN's labels as class ids: a name in `names` (--label-map, or the model's label2id; exact, then
    ignoring case), else an integer. Unknown names and ids outside the model's classes are errors naming the fix."""
    folded = {str(k).casefold(): v for k, v in names.items()}
    out, unknown = [], []
    for value in data.labels:
        key = str(value).strip()
        if key in names:
            out.append(int(names[key]))
        elif _integer(value) is not None:
            out.append(_integer(value))
        elif key.casefold() in folded:
            out.append(int(folded[key.casefold()]))
        else:
            out.append(None)
            unknown.append(key)
    col = data.label_column
    if unknown:
        distinct = sorted(set(unknown))
        guess = ",".join(f"{n}={i}" for i, n in enumerate(sorted({str(v).strip() for v in data.labels})))
        raise ValueError(f"{data.path}: the labels in column {col!r} must be class ids or names the model knows; "
                         f"{', '.join(repr(u) for u in distinct[:5])} {'is' if len(distinct) == 1 else 'are'} neither "
                         f"(names from {source}: {sorted(names) or 'none'}); map them with --label-map, e.g. "
                         f"--label-map {guess} (each name = the model's class id for it)")
    bad = sorted({y for y in out if y < 0 or (num_labels is not None and y >= num_labels)})
    if bad:
        have = f"0..{num_labels - 1}" if num_labels else "ids >= 0"
        raise ValueError(f"{data.path}: label id(s) {bad[:5]} in column {col!r} are outside the model's classes "
                         f"({have}); check the labels, or map them with --label-map NAME=ID")
    return out


# ---- model --------------------------------------------------------------------------------------------------

def model_config(name_or_path) -> dict:
    from ..harness.models import resolve_model_dir
    return json.loads((resolve_model_dir(name_or_path) / "config.json").read_text())


def fine_tune(base, texts, labels, num_labels: int, cfg, names: Optional[dict] = None):
    """(model, tokenizer): `base` with a new head fine-tuned on (texts, labels) by `dupfast.finetune.fit`."""
    from ..finetune import fit, seed_everything
    from ..harness.models import load_model
    from ..samples import Sample, validate

    train = validate([Sample(t, y) for t, y in zip(texts, labels)], "DATA (the fine-tuning set)")
    seed_everything(cfg.seed)  # the new head is drawn here: the same model from the same seed
    model, tok = load_model(base, num_labels=num_labels)
    fit(model, tok, train, cfg, desc="fine-tune")
    if names:  # the saved model maps the same names (later commands read config.label2id)
        model.config.label2id = {str(k): int(v) for k, v in names.items()}
        model.config.id2label = {int(v): str(k) for k, v in names.items()}
    return model.eval(), tok


def clean_accuracy(model, tok, texts, labels, max_len: int) -> dict:
    """Accuracy on the clean set, the majority-class rate, and balanced accuracy (mean per-class recall)."""
    from ..batching import predict

    pred = predict(model, tok, texts, DETECT_BATCH, max_len).tolist()
    counts = collections.Counter(labels)
    hits = collections.Counter(y for p, y in zip(pred, labels) if p == y)
    return {"accuracy": sum(hits.values()) / len(labels), "majority_rate": max(counts.values()) / len(labels),
            "balanced_accuracy": sum(hits[c] / counts[c] for c in counts) / len(counts), "classes": len(counts)}


def at_chance(acc: dict) -> bool:
    # the majority rate is the brief's yardstick; balanced accuracy keeps a good model on an imbalanced clean set
    # (majority 0.97) from reading as chance
    return (acc["accuracy"] <= acc["majority_rate"] + CHANCE_MARGIN
            and acc["balanced_accuracy"] <= 1 / acc["classes"] + CHANCE_MARGIN)


# ---- report -------------------------------------------------------------------------------------------------

def trigger_candidates(texts, flags, top: int = 10) -> list:
    """Words in a larger share of the flagged rows than of the kept ones (rows counted once per word), ranked by
    count x log ratio: a trigger word sits in many flagged rows and few kept ones."""
    n_f = sum(flags)
    n_k = len(flags) - n_f
    if n_f == 0 or n_k == 0:
        return []
    in_f, in_k = collections.Counter(), collections.Counter()
    for text, f in zip(texts, flags):
        (in_f if f else in_k).update(set(WORD.findall(text.lower())))
    least = max(2, math.ceil(0.01 * n_f))  # a word of one or two flagged rows says nothing
    rows = []
    for word, c in in_f.items():
        ratio = ((c + 0.5) / (n_f + 1)) / ((in_k[word] + 0.5) / (n_k + 1))  # +0.5: a word absent from kept rows
        if c >= least and ratio >= 2:
            rows.append({"word": word, "flagged": c, "flagged_share": c / n_f, "kept": in_k[word],
                         "kept_share": in_k[word] / n_k, "ratio": ratio})
    rows.sort(key=lambda r: -r["flagged"] * math.log(r["ratio"]))
    return rows[:top]


def plot_scores(path, scores, flags, threshold):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s, f = np.asarray(scores, dtype=np.float64), np.asarray(flags, dtype=bool)
    bins = np.histogram_bin_edges(s, bins="doane")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist([s[~f], s[f]], bins=bins, stacked=True, color=["#0072B2", "#D55E00"],
            label=[f"kept ({int((~f).sum())})", f"flagged ({int(f.sum())})"])
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("score (larger = more suspicious)")
    ax.set_ylabel("rows")
    ax.set_title("dupfast screen")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(out: pathlib.Path, data: Data, scores, flags) -> list:
    """kept.csv and flagged.csv: every original column (one named like ours gets an `original_` prefix), then
    row_id, score, flag; returns the renamed columns."""
    renamed = [c for c in data.header if c in OWN_COLUMNS]
    header = [f"original_{c}" if c in OWN_COLUMNS else c for c in data.header] + list(OWN_COLUMNS)

    def cell(v):
        if v is None:
            return ""
        return json.dumps(v) if isinstance(v, (dict, list)) else v  # JSON lines: nested values stay JSON

    files = {name: open(out / name, "w", newline="", encoding="utf-8") for name in ("kept.csv", "flagged.csv")}
    try:
        writers = {name: csv.writer(fh) for name, fh in files.items()}
        for w in writers.values():
            w.writerow(header)
        for i, (rec, s, f) in enumerate(zip(data.records, scores, flags)):
            row = [cell(rec.get(c)) for c in data.header] + [i, f"{s:.6g}", int(f)]
            writers["flagged.csv" if f else "kept.csv"].writerow(row)
    finally:
        for fh in files.values():
            fh.close()
    return renamed


def _md_report(summary: dict, candidates: list, args) -> str:
    v = summary.get("verdict") or {}
    n, k = summary["samples"], summary["flagged"]
    acc = summary.get("clean_accuracy")
    model = (f"`{summary['base']}` fine-tuned on DATA, saved in `model/`" if summary.get("base")
             else f"`{summary['model']}` (as given)")
    lines = [f"# dupfast screen: `{summary['data']}`", "", f"**{summary['verdict_sentence']}**", "",
             "| | |", "|---|---|",
             f"| rows | {n:,} |", f"| flagged | {k:,} ({k / n:.1%}) in `flagged.csv` |",
             f"| kept | {n - k:,} in `kept.csv` |",
             f"| threshold | {summary['threshold']:.4g} (FRR {summary['frr']:.0%}, mode {summary['mode']}) |",
             f"| clean set | `{summary['clean']}` ({summary['clean_rows']:,} rows) |", f"| model | {model} |"]
    if acc:
        lines.append(f"| clean accuracy | {acc['accuracy']:.3f} (majority class {acc['majority_rate']:.3f}) |")
    if v.get("p_value") is not None:
        lines.append(f"| presence test | p = {v['p_value']:.3g} |")
    lines += ["", "![score histogram](screen_hist.png)", "", "## Trigger candidates", ""]
    if candidates:
        lines += ["Words over-represented in the flagged rows (rows holding the word; a backdoor's trigger words "
                  "top this list):", "", "| word | flagged rows | kept rows | ratio |", "|---|---:|---:|---:|"]
        lines += [f"| `{c['word']}` | {c['flagged']:,} ({c['flagged_share']:.1%}) | {c['kept']:,} "
                  f"({c['kept_share']:.1%}) | {c['ratio']:.1f} |" for c in candidates]
    else:
        lines.append("No word is in at least twice the share of flagged rows as of kept rows.")
    if "auroc" in summary:
        lines += ["", "## Against DATA's poison_label column", "",
                  f"AUROC {summary['auroc']:.3f}; at the threshold FAR {summary.get('far', float('nan')):.3f} "
                  f"(poisoned rows kept), FRR {summary.get('frr_observed', float('nan')):.3f} (clean rows flagged).",
                  "", "![ROC](screen_roc.png)"]
    for note in summary.get("notes", ()):
        lines += ["", f"Note: {note}"]
    out = pathlib.Path(args.out)
    lines += ["", "## Next", "",
              "- train on `kept.csv` (every original column is there), or unlearn the flagged rows:",
              f"  `dupfast purify {summary['model']} --suspect {summary['data']} --clean {summary['clean']} "
              f"--flags {out / 'flagged.csv'} --out PURIFIED`"]
    if v.get("poison_present") is False:
        lines.append("  (with no evidence of poison purify leaves the model as it is unless --force)")
    return "\n".join(lines) + "\n"


# ---- the command --------------------------------------------------------------------------------------------

def _check_args(args):
    if args.model and args.base:
        raise ValueError("--model (a classifier fine-tuned on DATA, used as it is) and --base (fine-tuned on DATA "
                         "here) exclude each other: pass one")
    given = [f"--{k.replace('_', '-')}" for k in TUNING if getattr(args, k) is not None]
    if args.model and given:
        raise ValueError(f"{', '.join(given)} set the fine-tuning, which --model skips: drop them, or use --base")


def run(args):
    import torch

    from ..detection import Detector, text_loader
    from ..finetune import FinetuneConfig
    from ..harness.detection_report import plot_roc, summarize
    from .detect import load_classifier
    from .outdir import clear_outputs, prepare_out

    _check_args(args)
    out = prepare_out(args.out, args.overwrite, OUTPUTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = None
    if not args.model:
        cfg = FinetuneConfig(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in TUNING.items()},
                             max_len=args.max_len)
    given_map = parse_label_map(args.label_map) if args.label_map else None
    data = read_data(args.data, args.text_column, args.label_column, need_labels=not args.model, role="DATA")
    clean = read_data(args.clean, args.text_column, args.label_column, need_labels=True, role="the clean set")
    source = args.model or args.base or DEFAULT_BASE
    config = model_config(source)
    source_names = "--label-map" if given_map else f"{source}'s config.label2id"
    names = given_map or {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}
    if args.model:  # the classifier's own classes bound the labels; a fine-tune takes as many as the data holds
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
        clean_labels = label_ids(clean, names, source_names, num_labels)
        model, tok = load_classifier(args.model)
    else:
        data_labels = label_ids(data, names, source_names, None)
        clean_labels = label_ids(clean, names, source_names, None)
        num_labels = max(2, max(data_labels + clean_labels) + 1, max(given_map.values()) + 1 if given_map else 0)
        info(args, f"dupfast screen: fine-tuning {source} on {len(data.texts):,} rows of {args.data} ({cfg.epochs} "
                   f"epochs, lr {cfg.lr:g}, batch {cfg.batch_size})")
        model, tok = fine_tune(source, data.texts, data_labels, num_labels, cfg, given_map)
    acc = clean_accuracy(model, tok, clean.texts, clean_labels, args.max_len)
    acc_line = (f"accuracy {acc['accuracy']:.3f} on the clean set, {acc['majority_rate']:.3f} for always "
                "predicting its majority class")
    if at_chance(acc):
        fix = ("screening reads the backdoor from what the model learned, and this one learned nothing: "
               f"fine-tune longer (--epochs {2 * cfg.epochs}) or with another --lr, try another --base, or check "
               "that DATA's and CLEAN's labels name the same classes (--label-map)") if cfg else (
              "check it is the model fine-tuned on DATA, and that CLEAN's labels use its class ids (--label-map)")
        if cfg:
            raise ValueError(f"the model fine-tuned from {source} is at chance: {acc_line}; {fix}")
        print(f"dupfast screen: warning: {args.model} is at chance ({acc_line}): its scores are not meaningful; "
              f"{fix}", file=sys.stderr)
    else:
        info(args, f"dupfast screen: {acc_line}")
    if cfg:  # the fine-tune is the long step: keep it on disk before detecting (rerun with --model OUT/model)
        clear_outputs(out, OUTPUTS)
        model.save_pretrained(str(out / "model"), safe_serialization=True)
        tok.save_pretrained(str(out / "model"))

    det = Detector(mode=args.mode or "default", frr=DEFAULT_FRR if args.frr is None else args.frr)
    # the forward passes: a bar per pass (on with --progress, or when stderr is a terminal)
    clean_loader = with_bar(list(text_loader(tok, clean.texts, clean_labels, DETECT_BATCH, args.max_len,
                                             name="clean texts")), "clean")
    pool = with_bar(list(text_loader(tok, data.texts, None, DETECT_BATCH, args.max_len)), "DATA")
    result = det.fit(model, clean_loader).score(model, pool).sorted_by_index()
    scores, flags = result.scores.tolist(), [bool(f) for f in result.row_flags(len(data.texts))]

    if not cfg:
        clear_outputs(out, OUTPUTS)  # the results exist: only now replace an earlier run's files
    renamed = write_tables(out, data, scores, flags)
    det.save(out / "detector")
    summary = summarize(result, data.poison, det.frr)
    if "frr" in summary:  # the observed FRR on DATA's clean rows, not the target
        summary["frr_observed"] = summary.pop("frr")
    candidates = trigger_candidates(data.texts, flags)
    summary.update({"data": str(args.data), "clean": str(args.clean), "rows": len(data.texts),
                    "clean_rows": len(clean.texts), "kept": len(flags) - sum(flags), "model": str(args.model or
                    out / "model"), "base": None if args.model else str(source), "clean_accuracy": acc,
                    "fine_tune": dataclasses.asdict(cfg) if cfg else None, "mode": det.mode, "frr": det.frr,
                    "calibration": det.calibration, "verdict_sentence": result.summary,
                    "trigger_candidates": candidates, "renamed_columns": {c: f"original_{c}" for c in renamed}})
    if data.poison is not None and "notes" not in summary:
        from ..harness.detection_report import plot_histograms
        plot_histograms(out / "screen_hist.png", scores, data.poison, result.threshold, "dupfast screen")
    else:
        plot_scores(out / "screen_hist.png", scores, flags, result.threshold)
    if "auroc" in summary:
        plot_roc(out / "screen_roc.png", {"screen": (data.poison, scores)}, "dupfast screen")
    (out / "screen.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_md_report(summary, candidates, args), encoding="utf-8")
    for note in summary.get("notes", ()):
        info(args, f"dupfast screen: note: {note}")
    if renamed:
        info(args, f"dupfast screen: note: DATA's column(s) {renamed} are written as original_<name> beside "
                   "dupfast's own")
    print(f"dupfast screen: {result.summary}", file=sys.stderr)
    print(json.dumps({"rows": len(flags), "flagged": sum(flags), "poison_present": result.poison_present,
                      "p_value": result.p_value, "clean_accuracy": round(acc["accuracy"], 4),
                      **({"auroc": summary["auroc"]} if "auroc" in summary else {}),
                      "report": str(out / "report.md")}))
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser("screen", help="find the poisoned rows of a data set (fine-tune, detect, report)",
                              description=synopsis(__doc__),
                              example="dupfast screen train.csv --clean dev.tsv --out runs/screen")
    p.add_argument("data", help="the data set to screen (.csv, .tsv, .jsonl; .txt only with --model)")
    p.add_argument("--clean", required=True, help="a few hundred rows you trust to be clean, labelled")
    p.add_argument("--out", required=True, help="output folder (new or empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --out (only the files this command writes)")
    p.add_argument("--model", help="a classifier already fine-tuned on DATA (local HF folder): used as it is")
    p.add_argument("--base", help=f"the model fine-tuned on DATA when --model is not given: a short name or an HF "
                                  f"folder (default: {DEFAULT_BASE})")
    p.add_argument("--label-map", help="string labels to class ids, e.g. negative=0,positive=1 (default: the "
                                       "model's config.label2id)")
    p.add_argument("--text-column", help="the text column's name (default: inferred, see dupfast.tables)")
    p.add_argument("--label-column", help="the label column's name (default: inferred)")
    p.add_argument("--mode", default=None, choices=("default", "dup", "dan"), help="detection mode (default: default)")
    p.add_argument("--frr", type=_fraction, default=None,
                   help=f"false rejection rate on clean data (default: {DEFAULT_FRR})")
    p.add_argument("--epochs", type=positive_int, help=f"fine-tuning epochs (default: {TUNING['epochs']})")
    p.add_argument("--lr", type=float, help=f"fine-tuning learning rate (default: {TUNING['lr']:g})")
    p.add_argument("--batch-size", type=positive_int, help=f"fine-tuning batch (default: {TUNING['batch_size']})")
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens kept per text (default: 128)")
    p.add_argument("--seed", type=int, help=f"fine-tuning seed (default: {TUNING['seed']})")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    add_progress_flags(p)
    p.set_defaults(func=run)
    return p

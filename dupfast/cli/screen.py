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
import pathlib
import sys
from typing import Optional

from .argtypes import (add_label_map, add_progress_flags, add_threads, config_num_labels, info, label_ids,
                       label_names, model_config, parse_label_map, positive_int, synopsis, with_bar)
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


# ---- model --------------------------------------------------------------------------------------------------

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


FILES = (("kept.csv", "the kept rows: every original column, then row_id, score, flag"),
         ("flagged.csv", "the flagged rows, as kept.csv (`dupfast purify --flags` reads either)"),
         ("screen.json", "every number of this report"),
         ("screen_hist.png", "the score histogram"), ("screen_roc.png", "the ROC against DATA's poison_label"),
         ("model", "the model fine-tuned on DATA (`--model` of a rerun, the MODEL of `dupfast purify`)"),
         ("detector", "the fitted detector (`dupfast purify --detector`)"))


def _md_report(summary: dict, args) -> list:
    from .report import code, detection_page

    v = summary.get("verdict") or {}
    acc = summary.get("clean_accuracy")
    model = (f"`{summary['base']}` fine-tuned on DATA, saved in `model/`" if summary.get("base")
             else f"`{summary['model']}` (as given)")
    facts = [("clean set", f"`{summary['clean']}` ({summary['clean_rows']:,} rows)"), ("model", model)]
    if acc:
        facts.append(("clean accuracy", f"{acc['accuracy']:.3f} (majority class {acc['majority_rate']:.3f})"))
    lines = detection_page(f"dupfast screen: {code(summary['data'])}", summary, summary["frr"], "screen", facts,
                           " in `flagged.csv`", " in `kept.csv`")
    out = pathlib.Path(args.out)
    lines += ["", "## Next", "",
              "- train on `kept.csv` (every original column is there), or unlearn the flagged rows:",
              f"  `dupfast purify {summary['model']} --suspect {summary['data']} --clean {summary['clean']} "
              f"--flags {out / 'flagged.csv'} --out PURIFIED`"]
    if v.get("poison_present") is False:
        lines.append("  (with no evidence of poison purify leaves the model as it is unless --force)")
    return lines


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
    from ..harness.detection_report import summarize, write_plots
    from . import report
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
    names, source_names = label_names(args.label_map, config, source)
    if args.model:  # the classifier's own classes bound the labels; a fine-tune takes as many as the data holds
        num_labels = config_num_labels(config)
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
    summary.update({"data": str(args.data), "clean": str(args.clean), "rows": len(data.texts),
                    "clean_rows": len(clean.texts), "model": str(args.model or out / "model"),
                    "base": None if args.model else str(source), "clean_accuracy": acc,
                    "fine_tune": dataclasses.asdict(cfg) if cfg else None, "mode": det.mode, "frr": det.frr,
                    "calibration": det.calibration, "verdict_sentence": result.summary,
                    "trigger_candidates": report.trigger_candidates(
                        data.texts, flags, model=model, tokenizer=tok, clean_texts=clean.texts, detection=result,
                        max_len=args.max_len, batch_size=DETECT_BATCH),
                    "renamed_columns": {c: f"original_{c}" for c in renamed}})
    summary["plots"] = write_plots(out, "screen", scores, flags, data.poison, result.threshold, summary)
    (out / "screen.json").write_text(json.dumps(summary, indent=2))
    report.write(out, _md_report(summary, args), FILES)
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
    add_label_map(p)
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
    add_threads(p)
    add_progress_flags(p)
    p.set_defaults(func=run)
    return p

"""`dupfast detect`: flag backdoor-triggered texts in a CSV/TSV with a (possibly backdoored) classifier.

    dupfast detect MODEL --texts pool.tsv --clean dev.tsv --out DIR [--mode default|dup|dan] [--frr 0.05]
                   [--label-map neg=0,pos=1]
    dupfast detect MODEL --texts pool.tsv --pool-only --out DIR        (no clean set: uncalibrated)

MODEL is the fine-tuned classifier to screen: a local HF sequence-classifier folder, or a short name
(dupfast.harness.models.model_names()) only if that folder holds a fine-tuned head (a base model would get a new
random head each run). Files are CSV, TSV, JSON lines or .txt, read by `dupfast.tables`: the text column by
name (text, sentence, review, ... or --text-column), the clean set's label column likewise (label, ... or
--label-column); DUP/OpenBackdoor CSV dumps (columns 0,1,2 = text, label, poison_label) are understood.
Without --clean, only with --pool-only, the detector calibrates on the pool itself (its FRR is then
uncalibrated). The clean set's labels may be names (negative, positive): mapped through the model's
config.label2id, or --label-map negative=0,positive=1. Every run prints the pool's verdict in one line (is there
poison here?). Writes DIR/scores.csv first, then
    detector/           the fitted detector (reusable with --detector, and by `dupfast purify --detector`)
    detect.json         counts, threshold, verdict, trigger candidates; with a poison_label column in the pool
                        (evaluation data) also AUROC/FAR/FRR (metrics the labels cannot support are left out
                        with a note)
    detect_hist.png     the score histogram with the threshold (clean vs poisoned rows with a poison_label
                        column, else kept vs flagged); detect_roc.png: the ROC, with a poison_label column
    report.md           the verdict, the counts, the histogram (and ROC), trigger candidates (words
                        over-represented in flagged rows, with the share of them whose prediction flips when
                        the word is deleted) and the files
An existing DIR with entries is refused unless --overwrite.
"""
import argparse
import csv
import pathlib
import sys

from .argtypes import (add_label_map, add_progress_flags, add_threads, info, label_ids, label_names, model_config,
                       positive_int, synopsis, with_bar)

OUTPUTS = ("scores.csv", "detect.json", "detect_hist.png", "detect_roc.png", "detector", "report.md")
FILES = (("scores.csv", "index, score, flag, top token (the token the model's reading token attends most) and text "
                        "of every pool row"),
         ("detect.json", "every number of this report"), ("detect_hist.png", "the score histogram"),
         ("detect_roc.png", "the ROC against the pool's poison_label column"),
         ("detector", "the fitted detector (`--detector` of `dupfast detect` and `dupfast purify`)"))
# the Detector's defaults, shown in --help (importing it would load torch); tests/test_cli_help.py holds them equal
DEFAULT_FRR, DEFAULT_POOL_TRIM = 0.05, 0.5


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {value:g}")
    return value


def add_parser(subparsers):
    p = subparsers.add_parser("detect", help="flag backdoor-triggered inputs of a classifier (DUP detection)",
                              description=synopsis(__doc__),
                              example="dupfast detect runs/victim --texts pool.csv --clean dev.tsv --out runs/detect")
    p.add_argument("model", help="the fine-tuned classifier: local HF folder, or a short name holding a head")
    p.add_argument("--texts", required=True, help="CSV/TSV/JSONL/TXT of texts to screen (the pool)")
    p.add_argument("--clean", help="CSV/TSV/JSONL of clean labelled texts to calibrate on (required unless "
                                   "--pool-only or --detector)")
    p.add_argument("--out", required=True, help="output folder (new or empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --out (only the files this command writes)")
    p.add_argument("--mode", default=None, choices=("default", "dup", "dan"), help="detection mode (default: default)")
    p.add_argument("--frr", type=_fraction, default=None,
                   help=f"false rejection rate on clean data (default: {DEFAULT_FRR})")
    p.add_argument("--pool-only", action="store_true",
                   help="no clean set: calibrate on the pool itself (uncalibrated FRR, no poison verdict)")
    p.add_argument("--pool-trim", type=_fraction, default=None,
                   help=f"with --pool-only: share of the pool left out as suspicious while calibrating "
                        f"(default: {DEFAULT_POOL_TRIM})")
    p.add_argument("--detector", help="a folder saved by a previous run (skips fitting)")
    p.add_argument("--text-column", help="the text column's name (default: inferred, see dupfast.tables)")
    p.add_argument("--label-column", help="the clean set's label column (default: inferred)")
    add_label_map(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass")
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens per text; longer texts are truncated")
    p.add_argument("--autocast", choices=("none", "bf16", "auto"), default=None,
                   help="forward passes under bf16 autocast; auto: bf16 where the CPU/GPU computes it natively "
                        "(AMX / AVX512-BF16), else fp32 (default: none)")
    p.add_argument("--bf16", action="store_true", help="the same as --autocast bf16")
    add_threads(p)
    add_progress_flags(p)
    p.set_defaults(func=run)
    return p


def load_classifier(name_or_path):
    """The fine-tuned sequence classifier in a folder (or a short name's folder), with its own head."""
    import json
    from transformers import AutoModelForSequenceClassification
    from ..harness.models import load_tokenizer, resolve_model_dir

    folder = resolve_model_dir(name_or_path)
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"model {name_or_path} ({folder}) has no fine-tuned classification head (architectures: "
                         f"{archs or 'none'}): detection screens the classifier you deploy, and a new random head "
                         "would give different scores on every run; pass the fine-tuned model's folder")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    tok = load_tokenizer(folder)
    if model.config.pad_token_id is None:  # decoder LMs: batches need a pad id
        model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def _conflicts(args):
    if args.detector:
        given = [f"--{k.replace('_', '-')}" for k in ("clean", "mode", "frr", "pool_trim", "label_map")
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--detector scores with a fitted detector as saved; {', '.join(given)} would be ignored: "
                             "drop them, or fit a new detector instead")
    elif args.clean and args.pool_trim is not None:
        raise ValueError("--pool-trim sets pool-only calibration, which runs only without --clean")
    elif args.clean and args.pool_only:
        raise ValueError("--pool-only calibrates on the pool without a clean set: drop --clean, or --pool-only")
    elif args.label_map and not args.clean:
        raise ValueError("--label-map maps the clean set's labels, and there is no --clean: drop --label-map")


def run(args):
    import json

    import torch

    from ..detection import Detector, text_loader
    from ..detection.triggers import piece_words
    from ..harness.detection_report import write_report
    from ..tables import read_table
    from . import report
    from .outdir import clear_outputs, prepare_out

    _conflicts(args)
    out = prepare_out(args.out, args.overwrite, OUTPUTS)
    if args.detector and args.overwrite and pathlib.Path(args.out).resolve() in pathlib.Path(args.detector).resolve().parents:
        raise ValueError(f"--detector {args.detector} lies inside --out {args.out}, which --overwrite would clear: "
                         "choose another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    pool_table = read_table(args.texts, args.text_column, role="the pool")
    texts, poison = pool_table.texts, pool_table.poison_labels
    if not args.clean and not args.detector and not args.pool_only:
        from ..detection.api import NEED_CLEAN
        raise ValueError(NEED_CLEAN.replace("clean=...", "--clean FILE").replace("pool_only=True", "--pool-only")
                         .format(need=40))
    clean = None
    if args.clean:  # labels as written, names mapped to class ids before any model loads (the head checks the range)
        table = read_table(args.clean, args.text_column, args.label_column, need_labels=True, role="the clean set",
                           raw_labels=True)
        names = label_names(args.label_map, model_config(args.model), args.model)
        clean = (table.texts, label_ids(table, *names, None))
    det = Detector.load(args.detector) if args.detector else None
    model, tok = load_classifier(args.model)
    if args.bf16 and args.autocast not in (None, "bf16"):
        raise ValueError(f"--bf16 contradicts --autocast {args.autocast}")
    autocast = "bf16" if args.bf16 else (None if args.autocast in (None, "none") else args.autocast)
    # the forward passes are the long step: a bar per pass (on when --progress, or stderr is a terminal)
    pool = with_bar(list(text_loader(tok, texts, None, args.batch_size, args.max_len)), "pool")
    if det is not None:
        det.autocast = autocast
        result = det.score(model, pool)
    else:
        opts = {} if args.pool_trim is None else {"pool_trim": args.pool_trim}
        det = Detector(mode=args.mode or "default", frr=0.05 if args.frr is None else args.frr, autocast=autocast, **opts)
        if clean is None:
            result = det.fit_pool(model, pool).pool_result
        else:
            clean_loader = text_loader(tok, clean[0], clean[1], args.batch_size, args.max_len, name="clean texts")
            result = det.fit(model, with_bar(list(clean_loader), "clean")).score(model, pool)
    result = result.sorted_by_index()
    # the results exist: only now replace an earlier run's files, scores first (the report may still fail)
    clear_outputs(out, OUTPUTS)
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        # top_token: the word holding the token the classifier's reading token attends most (the trigger, on a
        # triggered input; the raw piece where it lies in no word, e.g. punctuation)
        top = [None] * len(texts)
        if result.top_tokens is not None:
            words = piece_words(texts, result.top_tokens.tolist(), tok, args.max_len)
            top = [w or p for w, p in zip(words, result.top_words(tok))]
        w.writerow(["index", "score", "flag", "top_token", "text"])
        for i, (s, f) in enumerate(zip(result.scores.tolist(), result.flags.tolist())):
            w.writerow([i, f"{s:.6g}", int(f), top[i] or "", texts[i]])
    if not args.detector:
        det.save(out / "detector")
    flags = result.flags.tolist()
    # the model is at hand: each candidate's flip rate (does deleting the word change the prediction?)
    candidates = report.trigger_candidates(texts, flags, model=model, tokenizer=tok, detection=result,
                                           clean_texts=clean[0] if clean else None, max_len=args.max_len,
                                           batch_size=args.batch_size)
    extra = {"mode": det.mode, "calibration": det.calibration, "model": str(args.model), "texts": str(args.texts),
             "clean": str(args.clean) if args.clean else None, "detector": args.detector,
             "verdict_sentence": result.summary, "trigger_candidates": candidates,
             "top_tokens_of_flagged": report.top_token_counts(top, flags)}
    summary = write_report(out, result, poison, name="detect", frr=det.frr, extra=extra)
    report.write(out, _md_report(summary, det.frr, args, len(clean[0]) if clean else None), FILES)
    for note in summary.get("notes", ()):
        info(args, f"dupfast detect: note: {note}")
    print(f"dupfast detect: {result.summary}", file=sys.stderr)
    print(json.dumps({**{k: summary[k] for k in summary if k in ("samples", "flagged", "threshold", "auroc", "far",
                                                                    "frr")},
                      "report": str(out / "report.md")}))
    return 0


def _md_report(summary: dict, frr: float, args, clean_rows) -> list:
    from .report import code, detection_page

    if args.detector:
        calibration = f"the saved detector {code(args.detector)}"
    elif clean_rows is None:
        calibration = "the pool itself (--pool-only): the FRR is an estimate, not calibrated"
    else:
        calibration = f"the clean set {code(args.clean)} ({clean_rows:,} rows)"
    facts = [("calibrated on", calibration), ("model", code(args.model))]
    top = summary.get("top_tokens_of_flagged") or []
    if top:  # on a backdoored model the trigger is the token the flagged rows' reading token attends most
        facts.append(("most attended token of flagged rows",
                      ", ".join(f"{code(t['token'])} ({t['flagged_rows']:,} rows)" for t in top[:5])))
    return detection_page(f"dupfast detect: {code(args.texts)}", summary, frr, "detect", facts)

"""`dupfast detect`: flag backdoor-triggered texts in a CSV/TSV with a (possibly backdoored) classifier.

    dupfast detect MODEL --texts pool.tsv [--clean dev.tsv] --out DIR [--mode default|dup|dan] [--frr 0.05]

MODEL is a local HF sequence-classifier folder or a short name (dupfast.models.model_names()). Files are
CSV, TSV, JSON lines or .txt, read by `dupfast.tables`: the text column by name (text, sentence, review, ...
or --text-column), the clean set's label column likewise (label, ... or --label-column); DUP/OpenBackdoor
CSV dumps (columns 0,1,2 = text, label, poison_label) are understood. Without --clean the detector
calibrates on the pool itself. Writes DIR/scores.csv, DIR/detect.json and
DIR/detector/ (reusable with --detector); when the pool file has a poison_label column (evaluation
data), also AUROC/FAR/FRR and PNGs of the score histograms and ROC curve.
"""
import csv
import pathlib


def add_parser(subparsers):
    p = subparsers.add_parser("detect", help="flag backdoor-triggered inputs (DUP detection)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="local HF model folder or short name")
    p.add_argument("--texts", required=True, help="CSV/TSV/JSONL/TXT of texts to screen (the pool)")
    p.add_argument("--clean", help="CSV/TSV/JSONL of clean labelled texts to calibrate on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", default="default", choices=("default", "dup", "dan"))
    p.add_argument("--frr", type=float, default=0.05, help="false rejection rate on clean data (default 0.05)")
    p.add_argument("--pool-trim", type=float, default=None,
                   help="without --clean: share of the pool left out as suspicious while calibrating")
    p.add_argument("--detector", help="a folder saved by a previous run (skips fitting)")
    p.add_argument("--text-column", help="the text column's name (default: inferred, see dupfast.tables)")
    p.add_argument("--label-column", help="the clean set's label column (default: inferred)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(func=run)
    return p


def load_classifier(name_or_path, num_labels=None):
    """A fine-tuned folder keeps its own head; a bare short name gets a fresh head (num_labels or 2)."""
    import json
    from transformers import AutoModelForSequenceClassification
    from ..models import load_model, load_tokenizer, resolve_model_dir

    folder = resolve_model_dir(name_or_path)
    cfg = json.loads((folder / "config.json").read_text())
    if any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
        return model.eval(), load_tokenizer(folder)
    model, tok = load_model(name_or_path, num_labels=num_labels or 2)
    return model.eval(), tok


def run(args):
    import json

    import torch

    from ..detect import Detector
    from ..detect.api import text_loader
    from ..detect.report import write_report
    from ..tables import read_table

    if args.threads:
        torch.set_num_threads(args.threads)
    pool_table = read_table(args.texts, args.text_column, role="the pool")
    texts, poison = pool_table.texts, pool_table.poison_labels
    clean = None
    if args.clean:
        table = read_table(args.clean, args.text_column, args.label_column, need_labels=True, role="the clean set")
        clean = (table.texts, table.labels)
    model, tok = load_classifier(args.model, None if clean is None else max(clean[1]) + 1)
    autocast = "bf16" if args.bf16 else None
    pool = list(text_loader(tok, texts, None, args.batch_size, args.max_len))
    out = pathlib.Path(args.out)
    if args.detector:
        det = Detector.load(args.detector)
        det.autocast = autocast
        result = det.score(model, pool)
    else:
        opts = {} if args.pool_trim is None else {"pool_trim": args.pool_trim}
        det = Detector(mode=args.mode, frr=args.frr, autocast=autocast, **opts)
        if clean is None:
            result = det.fit_pool(model, pool)
        else:
            det.fit(model, list(text_loader(tok, clean[0], clean[1], args.batch_size, args.max_len)))
            result = det.score(model, pool)
        det.save(out / "detector")
    result = result.sorted_by_index()
    summary = write_report(out, result, poison, name="detect", frr=det.frr,
                           extra={"mode": det.mode, "calibration": det.calibration, "model": str(args.model)})
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "score", "flag", "text"])
        for i, (s, f) in enumerate(zip(result.scores.tolist(), result.flags.tolist())):
            w.writerow([i, f"{s:.6g}", int(f), texts[i]])
    print(json.dumps({k: summary[k] for k in summary if k in ("samples", "flagged", "threshold", "auroc", "far", "frr")}))
    return 0

"""`dupfast detect-prompts` and `dupfast purify-generative`: the generative siblings of detect / purify.

    dupfast detect-prompts LM --prompts pool.jsonl --clean clean.jsonl --out DIR [--mode default|dup|dan] [--frr 0.05]
    dupfast purify-generative LM --prompts pool.jsonl --clean clean.jsonl --out DIR [--triggers auto|none|w1,w2]
        [--set key=value ...]

LM: a local causal-LM folder (AutoModelForCausalLM, its tokenizer with a chat template) or a short name
(dupfast.harness.models, e.g. smollm2-135m). Files are CSV / TSV / JSON lines read by dupfast.tables: the pool's
`prompt` column (or --prompt-column); the clean set's `prompt` and `response` columns (its `label` column, the
task class, is read for --mode dup/dan). A `poison_label` column in the pool (evaluation data) adds AUROC/FRR/FAR.
detect-prompts writes DIR/scores.csv, then DIR/detect.json (counts, threshold, the verdict, trigger candidates),
DIR/detect_hist.png (the score histogram; detect_roc.png with a poison_label column) and DIR/report.md (the verdict,
counts, plots, trigger candidates: words over-represented in the flagged prompts). purify-generative writes
DIR/model/ (the purified model and tokenizer), DIR/purify.json, DIR/scores.csv of the detection it used,
DIR/purify_trajectory.png and DIR/report.md (the verdict that gated it, before -> after on held-out prompts, the
trigger candidates inserted into copies of the clean prompts (--triggers), the stop reason in words, the
trajectory); with no evidence of poison it unlearns nothing unless --force.
"""
import csv
import json
import pathlib

from .argtypes import add_progress_flags, add_threads, positive_int, synopsis
from .outdir import clear_outputs, prepare_out

DETECT_OUTPUTS = ("scores.csv", "detect.json", "detect_hist.png", "detect_roc.png", "report.md")
PURIFY_OUTPUTS = ("scores.csv", "purify.json", "model", "purify_trajectory.png", "report.md")
SCORES = ("scores.csv", "index, score and flag of every prompt of the pool")
DETECT_FILES = (SCORES, ("detect.json", "every number of this report"), ("detect_hist.png", "the score histogram"),
                ("detect_roc.png", "the ROC against the poison_label column"))
PURIFY_FILES = (("model", "the purified causal LM and its tokenizer: `AutoModelForCausalLM.from_pretrained`"),
                ("purify.json", "every number of this report (`report`) and the detection's (`detection`)"),
                SCORES, ("purify_trajectory.png", "the held-out numbers per evaluation"))


def _common(p):
    p.add_argument("model", help="causal LM: local HF folder or a short name")
    p.add_argument("--prompts", required=True, help="CSV/TSV/JSONL with a prompt column: the pool to screen")
    p.add_argument("--clean", required=True, help="CSV/TSV/JSONL with prompt and response columns (clean)")
    p.add_argument("--out", required=True, help="output folder (new or empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --out (only the files this command writes)")
    p.add_argument("--mode", default="default", choices=("default", "dup", "dan"),
                   help="detection mode (dup, dan: the clean set's label column is read)")
    p.add_argument("--frr", type=float, default=0.05, help="false rejection rate on clean data")
    p.add_argument("--prompt-column", default="prompt", help="the prompt column's name in both files")
    p.add_argument("--response-column", default="response", help="the clean set's response column")
    p.add_argument("--system", default=None, help="a system message for every prompt (default: the template's)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    add_threads(p)
    add_progress_flags(p)


def add_parser(subparsers):
    d = subparsers.add_parser("detect-prompts", help="flag backdoor-triggered prompts of a causal LM",
                              description=synopsis(__doc__),
                              example="dupfast detect-prompts smollm2-135m --prompts pool.jsonl --clean clean.jsonl "
                                      "--out runs/prompts")
    _common(d)
    d.set_defaults(func=run_detect)
    p = subparsers.add_parser("purify-generative", help="detection-guided unlearning of a causal LM",
                              description=synopsis(__doc__),
                              example="dupfast purify-generative smollm2-135m --prompts pool.jsonl --clean clean.jsonl "
                                      "--out runs/purified-lm")
    _common(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a GenerativeConfig field, e.g. --set max_steps=40 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="unlearn the flagged prompts even when the detection finds no evidence of poison")
    p.add_argument("--triggers", default="auto",
                   help="trigger candidates inserted into copies of the clean prompts' user text, which must keep "
                        "the clean response (the trigger is forgotten, not inverted): auto (default: dupfast.triggers "
                        "on the pool's prompts and the flags), none, or comma-separated words / phrases")
    p.set_defaults(func=run_purify)


def load_causal_lm(name_or_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..harness.models import resolve_model_dir
    folder = resolve_model_dir(name_or_path)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return model.eval(), tok


def _inputs(args, need_labels):
    from ..generative import chat_batches
    from ..tables import read_table
    pool = read_table(args.prompts, text_column=args.prompt_column)
    clean_p = read_table(args.clean, text_column=args.prompt_column, need_labels=need_labels, role="the clean set")
    clean_r = read_table(args.clean, text_column=args.response_column)
    return pool, clean_p, clean_r, chat_batches


def _detect(args):
    import torch

    from ..generative import detect_prompts
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model)
    pool, clean_p, clean_r, chat_batches = _inputs(args, args.mode in ("dup", "dan"))
    clean = chat_batches(tok, clean_p.texts, clean_r.texts, labels=clean_p.labels if args.mode != "default" else None,
                         batch_size=args.batch_size, system=args.system)
    pool_b = chat_batches(tok, pool.texts, batch_size=args.batch_size, system=args.system)
    res = detect_prompts(model, pool_b, clean=clean, mode=args.mode, frr=args.frr, batch_size=args.batch_size)
    return model, tok, pool, pool_b, clean, res.sorted_by_index(), clean_p.texts


def _write_scores(out: pathlib.Path, pool, res):
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "score", "flag"] + (["poison_label"] if pool.poison_labels is not None else []))
        for i in range(len(pool)):
            w.writerow([i, f"{float(res.scores[i]):.6g}", int(res.flags[i])] +
                       ([pool.poison_labels[i]] if pool.poison_labels is not None else []))


def _summary(args, pool, res, tok, clean_texts):
    """detection_report.summarize's numbers (`frr`: the target, `frr_observed` on the pool's clean prompts), the
    verdict sentence and trigger candidates; `pool` and `metrics` as before (AUROC & co with a poison_label column).
    The candidates carry no flip rate: a causal LM's prediction is a response, not a class."""
    from ..harness.detection_report import has_both_classes, summarize
    from ..harness.metrics import detection_report
    from .report import trigger_candidates

    s = summarize(res, pool.poison_labels, args.frr)
    if "frr" in s:
        s["frr_observed"] = s.pop("frr")
    s.update({"mode": args.mode, "frr": args.frr, "pool": len(pool), "verdict_sentence": res.summary,
              "trigger_candidates": trigger_candidates(pool.texts, res.flags.tolist(), tokenizer=tok,
                                                       clean_texts=clean_texts, detection=res)})
    if has_both_classes(pool.poison_labels):
        s["metrics"] = detection_report(pool.poison_labels, res.flags.numpy(), res.scores.numpy())
    return s


def run_detect(args):
    from ..harness.detection_report import write_plots
    from .report import code, detection_page, write

    out = prepare_out(args.out, args.overwrite, DETECT_OUTPUTS)
    model, tok, pool, _, _, res, clean_texts = _detect(args)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out, DETECT_OUTPUTS)
    _write_scores(out, pool, res)
    summary = _summary(args, pool, res, tok, clean_texts)
    summary["plots"] = write_plots(out, "detect", res.scores.numpy(), res.flags.numpy(), pool.poison_labels,
                                   res.threshold, summary)
    (out / "detect.json").write_text(json.dumps(summary, indent=2))
    facts = [("calibrated on", f"the clean prompts {code(args.clean)}"), ("model", code(args.model))]
    write(out, detection_page(f"dupfast detect-prompts: {code(args.prompts)}", summary, args.frr, "detect", facts),
          DETECT_FILES)
    print(json.dumps({k: summary[k] for k in ("mode", "frr", "threshold", "pool", "flagged")}
                     | {"report": str(out / "report.md")}))


def run_purify(args):
    from ..generative import GenerativeConfig, purify_generative
    from ..purification.config import parse_overrides
    from . import report as md
    from .purify import trigger_option
    overrides = parse_overrides(args.set, GenerativeConfig)
    triggers = trigger_option(args.triggers)  # a bad --triggers fails before the model is loaded
    out = prepare_out(args.out, args.overwrite, PURIFY_OUTPUTS)
    model, tok, pool, pool_b, clean, res, clean_texts = _detect(args)
    model, report = purify_generative(model, pool_b, clean=clean, detection=res, force=args.force, tokenizer=tok,
                                      triggers=triggers, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out, PURIFY_OUTPUTS)
    _write_scores(out, pool, res)
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    rep = report.to_dict()
    detection = _summary(args, pool, res, tok, clean_texts)
    (out / "purify.json").write_text(json.dumps({"detection": detection, "report": rep}, indent=2, default=str))
    gate = md.detection_gate(args.prompts, f"a detector fitted on the clean prompts {md.code(args.clean)}", res,
                             args.force)
    md.write_purify(out, rep, args.model, gate, PURIFY_FILES, generative=True)
    print(json.dumps({"flagged": int(res.flags.sum()), "stop_reason": report.stop_reason, "steps": report.steps_run,
                      "report": str(out / "report.md")}))

"""`dupfast btu`: defended fine-tuning (Backdoor Token Unlearning) from the command line.

    dupfast btu minilm train.tsv --out runs/btu [--clean-tune clean.tsv] [--eval test.tsv]
                [--eval-poison test-poison.csv --target 1] [--expose-only] [--label-map neg=0,pos=1]

Files: .csv, .tsv or .jsonl with text and label columns found by name (`dupfast.tables`: SST-2's
`sentence<TAB>label`, OpenBackdoor CSV dumps `,0,1,2`, or --text-column / --label-column). Labels may be names
(negative, positive): mapped through the model's config.label2id, or --label-map negative=0,positive=1 (the
defended model's config then names its classes). Writes to <out>:
    btu_report.json     suspicious tokens (with the training rows holding each), the exposure rounds, per-step
                        timings and metrics
    model/              the defended model (safetensors + tokenizer), unless --expose-only
    report.md           the suspects with their evidence, the per-round table, the steps, before -> after (the
                        model fine-tuned without BTU vs the defended one, with --eval / --eval-poison)
    btu_suspects.png    the suspects' movement scores; btu_steps.png: CACC / ASR after each step (with --eval)
An existing `<out>` with entries is refused before any work unless --overwrite (which replaces only those).
"""
import dataclasses
import json

from .argtypes import (add_label_map, add_progress_flags, add_threads, info, label_ids, label_names, model_config,
                       positive_int, synopsis)

OUTPUTS = ("btu_report.json", "model", "report.md", "btu_suspects.png", "btu_steps.png")
FILES = (("btu_report.json", "every number of this report"), ("model", "the defended model: `from_pretrained`"),
         ("btu_suspects.png", "the suspects' movement scores"), ("btu_steps.png", "the metrics after each step"))


def read_samples(path, args, role, names, source):
    """The file's labelled samples, names among the labels mapped to class ids."""
    from ..tables import read_table
    table = read_table(path, args.text_column, args.label_column, need_labels=True, role=role, raw_labels=True)
    table.labels = label_ids(table, names, source, None)
    return table.samples()


def add_parser(subparsers):
    ap = subparsers.add_parser("btu", help="defended fine-tuning on possibly poisoned data: Backdoor Token Unlearning",
                               description=synopsis(__doc__),
                               example="dupfast btu minilm train.tsv --out runs/btu --eval test.tsv")
    ap.add_argument("model", help="short name (minilm, mpnet-base, smollm2-135m, gemma3-270m) or a local HF "
                                  "model folder")
    ap.add_argument("train", help="training file, possibly poisoned (.csv, .tsv or .jsonl)")
    ap.add_argument("--text-column", help="the text column's name in every file (default: inferred)")
    ap.add_argument("--label-column", help="the label column's name in every file (default: inferred)")
    add_label_map(ap)
    ap.add_argument("--out", required=True, help="output folder (report, defended model): new or empty, or --overwrite")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier run's results in --out (only the files this command writes)")
    ap.add_argument("--clean-tune", help="clean labelled file for the optional one-epoch clean tune")
    ap.add_argument("--eval", help="clean test file: CACC after every step")
    ap.add_argument("--eval-poison", help="triggered test file: ASR after every step (needs --target)")
    ap.add_argument("--target", type=int, help="the attack's target label, for ASR")
    ap.add_argument("--fraction", type=float, default=0.0005, help="k = fraction x vocabulary size per round")
    ap.add_argument("--exclude", nargs="*", default=(),
                    help="extra tokens never ranked, e.g. @ user on OLID (default: only the special tokens)")
    ap.add_argument("--max-document-share", type=float, default=None,
                    help="tokens in more than this share of the training inputs are never ranked (default: all "
                         "ranked, as the authors; 0.5 keeps a decoder's sentence-final token out: README)")
    ap.add_argument("--expose-against-clean-tune", action="store_true",
                    help="rank tokens by their movement in excess of the same rounds on the --clean-tune file "
                         "(beyond the paper; keeps a decoder's common tokens out of the suspects: README)")
    ap.add_argument("--expose-only", action="store_true", help="only rank suspicious tokens (step 1)")
    ap.add_argument("--epochs", type=positive_int, default=1, help="fine-tune epochs")
    ap.add_argument("--lr", type=float, default=2e-5, help="fine-tune and clean-tune learning rate")
    ap.add_argument("--batch-size", type=positive_int, default=64, help="fine-tune batch size")
    ap.add_argument("--max-len", type=positive_int, default=128, help="tokens per text; longer texts are truncated")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the new head, the exposure rounds and training")
    add_threads(ap)
    add_progress_flags(ap)
    ap.set_defaults(func=run)


def run(args):
    from .outdir import clear_outputs, prepare_out

    out = prepare_out(args.out, args.overwrite, OUTPUTS)  # a file, or an earlier run's folder: before any work
    if args.eval_poison and args.target is None:
        raise ValueError("--eval-poison needs --target (the attack's target label)")
    if args.expose_against_clean_tune and not args.clean_tune:
        raise ValueError("--expose-against-clean-tune needs --clean-tune (the clean file the rounds are compared to)")
    names = label_names(args.label_map, model_config(args.model), args.model)
    train = read_samples(args.train, args, "the training set", *names)
    tune = read_samples(args.clean_tune, args, "the clean-tune set", *names) if args.clean_tune else None
    test = read_samples(args.eval, args, "the test set", *names) if args.eval else None
    ptest = read_samples(args.eval_poison, args, "the triggered test set", *names) if args.eval_poison else None

    import torch

    from .. import btu
    from ..btu.expose import FULL_ROUND, SHALLOW_ROUND
    from ..finetune import FinetuneConfig
    from ..harness.models import load_model
    from . import report as report_md

    if args.threads:
        torch.set_num_threads(args.threads)
    exposure = btu.ExposureConfig(
        fraction=args.fraction, exclude_tokens=tuple(args.exclude), max_document_share=args.max_document_share,
        shallow=dataclasses.replace(SHALLOW_ROUND, seed=args.seed),
        full=dataclasses.replace(FULL_ROUND, seed=args.seed))
    # the pretrained model with a fresh head seeded as the exposure rounds are (BTU starts from it)
    given = names[0] if args.label_map else {}
    num_labels = max(2, max(s.label for s in train) + 1, *(v + 1 for v in given.values()))
    model, tok = load_model(args.model, num_labels=num_labels, seed=args.seed)
    if given:  # the defended model maps the same names (later commands read config.label2id)
        model.config.label2id = {str(k): int(v) for k, v in given.items()}
        model.config.id2label = {int(v): str(k) for k, v in given.items()}
    if args.expose_only:
        result = btu.expose(model, train, tokenizer=tok, config=exposure,
                            reference=tune if args.expose_against_clean_tune else None)
        report = {"model": args.model, "train": args.train, "exposure": result.to_dict()}
        model = None
    else:
        tuning = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                                warmup_ratio=0.0, weight_decay=0.01, seed=args.seed)
        cfg = btu.BTUConfig(exposure=exposure, finetune=tuning, clean_tune=dataclasses.replace(tuning, epochs=1),
                            expose_against_clean_tune=args.expose_against_clean_tune)
        evaluate = _evaluator(test, ptest, args.target, args.max_len) if (test or ptest) else None
        model, result = btu.train(model, train, clean_tune=tune, tokenizer=tok, config=cfg, evaluate=evaluate)
        report = {**result.to_dict(), "train": args.train}
    exposed = (report.get("exposure") or {}).get("suspects")
    ids = [x["token_id"] for x in exposed] if exposed else [x["id"] for x in report["suspects"]]
    report["suspect_evidence"] = report_md.token_evidence(tok, [s.text for s in train], [s.label for s in train], ids)
    clear_outputs(out, OUTPUTS)  # the results exist: only now replace an earlier run's
    (out / "btu_report.json").write_text(json.dumps(report, indent=2))
    if model is not None:
        model.save_pretrained(str(out / "model"), safe_serialization=True)
        tok.save_pretrained(str(out / "model"))
    _write_report(out, report, args)
    suspects = report["exposure"]["suspects"] if report.get("exposure") else report["suspects"]
    print(f"dupfast btu: {len(suspects)} suspicious tokens: "
          + " ".join(s["token"] for s in suspects[:20]) + (" ..." if len(suspects) > 20 else ""))
    for step in report.get("steps", []):
        print(f"  {step['step']:<10} {step['seconds']:>8.1f} s  {json.dumps(step.get('eval', {}))}")
    info(args, f"report: {out / 'report.md'} (numbers: {out / 'btu_report.json'})")
    return 0


def _write_report(out, report: dict, args):
    from . import report as md

    exposure = report.get("exposure") or {}
    suspects = exposure.get("suspects") or [{"token": s["token"]} for s in report.get("suspects", ())]
    md.plot_suspects(out / "btu_suspects.png", suspects)
    steps_png = None
    if any(s.get("eval") for s in report.get("steps", ())):
        steps_png = "btu_steps.png"
        md.plot_steps(out / steps_png, report["steps"])
    if args.expose_only:
        head = f"{len(suspects)} suspicious tokens ranked (--expose-only: nothing trained)."
    else:
        head = (f"{len(suspects)} suspicious tokens unlearned: their moved embedding dimensions were reset in the "
                "defended model `model/`.")
    lines = [f"# dupfast btu: {md.code(args.model)} on {md.code(args.train)}", "", f"**{head}**",
             *md.btu_lines(report, report["suspect_evidence"], "btu_suspects.png", steps_png)]
    md.write(out, lines, FILES)


def _evaluator(test, ptest, target, max_len):
    from ..harness import metrics
    from ..batching import predict

    def evaluate(model, tok):
        res = {}
        if test:
            res["cacc"] = metrics.cacc(predict(model, tok, [s.text for s in test], max_len=max_len),
                                       [s.label for s in test])
        if ptest:
            res["asr"] = metrics.asr(predict(model, tok, [s.text for s in ptest], max_len=max_len), target)
        return res
    return evaluate

"""`dupfast purify`: detection-guided LoRA unlearning of a backdoored classifier from the command line.

    dupfast purify MODEL --suspect pool.tsv --clean clean.tsv --out DIR [--flags flags.json | --detector DIR]
                   [--lambda-asr 1] [--lambda-acc 1] [--epochs 12] [--lr 5e-4] [--no-lora] [--set key=value ...]
                   [--force] [--save-adapters] [--label-map neg=0,pos=1]

MODEL: the fine-tuned (backdoored) classifier: a local HF folder, or a short name (minilm, mpnet-base,
smollm2-135m) only if its folder holds a fine-tuned head (a pretrained encoder is an error).
Text files: .csv, .tsv, .jsonl (columns found by name, `dupfast.tables`: text/sentence/review/... and
label, or --text-column / --label-column; OpenBackdoor dumps `,0,1,2`), or .txt (one text a line, suspect
set only). The clean set must be labelled. Without --flags, `dupfast.detect` flags the suspect
set first, or --detector DIR (a detector saved by `dupfast detect` / `dupfast screen`) flags it without fitting.
--flags: a JSON list of 0/1 (or {"flags": [...]}), a text file with one 0/1 per line, one per suspect row, or a
CSV/TSV with a `flag` column: `dupfast detect`'s scores.csv (`index` = row), `dupfast screen`'s flagged.csv or
kept.csv (`row_id` = row; the rows a file leaves out take the other flag). The clean set's labels may be names
(negative, positive): mapped through the model's config.label2id, or --label-map negative=0,positive=1.
When the detection finds no evidence of poison nothing is unlearned (DIR/model is the model as given, and the
report says so) unless --force. Writes
    model/              the purified model, merged (save_pretrained: safetensors + tokenizer)
    adapters/           with --save-adapters: the LoRA adapters (peft save_pretrained, safetensors) that turn MODEL
                        into model/ (PeftModel.from_pretrained(MODEL's model, DIR/adapters)); recovered from the
                        merged weights, exact up to float rounding (the largest weight error is in report.md)
    purify_report.json  data, held-out numbers per evaluation, the stop reason, the kept step, timings
    purify_trajectory.png  held-out flagged agreement and clean accuracy per evaluation
    report.md           what gated the run (the verdict, or the flags given), before -> after on the held-out rows,
                        the stop reason in words, the trajectory
An existing DIR with entries is refused before any work unless --overwrite (which replaces only those).
Under torchrun each process takes every WORLD_SIZE-th row of both sets (rank-strided shards).
"""
import csv
import json
import sys
import pathlib

from .argtypes import (add_label_map, add_progress_flags, config_num_labels, label_ids, label_names, model_config,
                       positive_int, synopsis, with_bar)


_FLAG_VALUES = {"0": 0, "1": 1, "false": 0, "true": 1, "False": 0, "True": 1}


def _flag(value, where: str) -> int:
    v = int(value) if isinstance(value, bool) else _FLAG_VALUES.get(str(value).strip())
    if v is None:
        raise ValueError(f"{where} is {value!r}; flags must be 0/1 or true/false")
    return v


def read_flags(path, n: int, texts=None, text_column=None):
    """One 0/1 flag per suspect row from a flags file (module docstring). A CSV/TSV that carries the rows' texts
    (detect's `text`, or the suspect set's own text column) is checked against `texts`: flags of another file
    are an error, not a silent mismatch."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such flags file: {p}")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        flags = data.get("flags") if isinstance(data, dict) else data
        if not isinstance(flags, list):
            raise ValueError(f"{p}: expected a JSON list of 0/1 or an object with a 'flags' list")
    else:
        flags = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        # a header row (not a bare 0/1) marks a table: detect's scores.csv, screen's flagged.csv / kept.csv
        if p.suffix.lower() in (".csv", ".tsv") and flags and flags[0] not in _FLAG_VALUES:
            return _table_flags(p, n, texts, text_column)
    values = [_flag(f, f"{p}: flag {i}") for i, f in enumerate(flags)]
    if len(values) != n:
        raise ValueError(f"{p} holds {len(values)} flags but the suspect set has {n} rows")
    return values


def _table_flags(p: pathlib.Path, n: int, texts, text_column):
    """Flags from a table with a `flag` column; rows by `row_id` (screen) or `index` (detect), else in order."""
    tsv = p.suffix.lower() == ".tsv"
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if tsv else ",",
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)  # as dupfast.tables reads
        header = reader.fieldnames or []
        if "flag" not in header:
            raise ValueError(f"{p}: no 'flag' column (columns: {header}); pass `dupfast detect`'s scores.csv, "
                             "`dupfast screen`'s flagged.csv or kept.csv, a JSON list, or one 0/1 a line")
        id_col = next((c for c in ("row_id", "index") if c in header), None)
        rows = [(reader.line_num, r) for r in reader]
    flags = [_flag(r["flag"], f"{p} line {line}: the flag") for line, r in rows]
    if id_col is None:  # no row ids: one flag per suspect row, in order
        if len(flags) != n:
            raise ValueError(f"{p} holds {len(flags)} flags (no row_id or index column) but the suspect set has "
                             f"{n} rows")
        return flags
    ids = []
    for line, r in rows:
        try:
            i = int(r[id_col])
        except (TypeError, ValueError):
            i = -1
        if not 0 <= i < n:
            raise ValueError(f"{p} line {line}: {id_col} {r[id_col]!r} is not a row of the suspect set (0..{n - 1}): "
                             "pass the flags of this suspect file")
        ids.append(i)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{p}: a {id_col} appears twice: pass one flags file as written by dupfast")
    col = next((c for c in ("text", text_column) if c and c in header), None)
    if texts is not None and col is not None:
        for (line, r), i in zip(rows, ids):
            if r[col] != texts[i]:
                raise ValueError(f"{p} line {line}: the text of row {i} differs from the suspect set's row {i} "
                                 f"({(r[col] or '')[:40]!r} vs {texts[i][:40]!r}): the flags are of another file; "
                                 "pass the suspect file they were computed on")
    if len(ids) == n:
        out = [0] * n
        for i, f in zip(ids, flags):
            out[i] = f
        return out
    # one side of screen's partition: flagged.csv lists the flagged rows, kept.csv the kept ones
    present = set(flags) or ({0} if "kept" in p.stem else {1} if "flagged" in p.stem else set())
    if len(present) != 1:
        raise ValueError(f"{p} lists {len(ids)} of the {n} suspect rows with "
                         f"{'both flag values' if present else 'no flag value'}, so the other rows' flags are "
                         "unknown: pass a file covering every row (scores.csv), or screen's flagged.csv / kept.csv")
    shown = present.pop()
    out = [1 - shown] * n
    for i in ids:
        out[i] = shown
    return out


OUTPUTS = ("model", "adapters", "purify_report.json", "purify_trajectory.png", "report.md")
FILES = (("model", "the purified model, merged: `AutoModelForSequenceClassification.from_pretrained`"),
         ("adapters", "the LoRA adapters that turn MODEL into `model/` (`peft.PeftModel.from_pretrained`)"),
         ("purify_report.json", "every number of this report"),
         ("purify_trajectory.png", "the held-out numbers per evaluation"))


def load_classifier(name_or_path, num_labels=None):
    """(model, tokenizer): the fine-tuned sequence classifier in a folder (or a short name's folder), with its
    own head and label count. A folder without one (a short name's pretrained encoder, a bare AutoModel save)
    is an error: a new random head would be "purified" instead of the backdoored one."""
    import json

    from ..harness.models import load_model, resolve_model_dir

    folder = resolve_model_dir(name_or_path)
    config = json.loads((folder / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"model {name_or_path} ({folder}) has no fine-tuned classification head (architectures: "
                         f"{archs or 'none'}): purify removes a backdoor from the classifier that learned it, so "
                         "pass the fine-tuned (backdoored) model's folder, not a pretrained encoder")
    own = config_num_labels(config)
    if num_labels is not None and num_labels != own:
        raise ValueError(f"--num-labels {num_labels}, but the classifier in {folder} has {own} labels")
    model, tok = load_model(folder, num_labels=own)
    return model.eval(), tok


def token_rows(tok, texts, labels, max_len: int, ids):
    """The texts tokenised once into `Rows` (index = their global row ids `ids`), in length order: the order of
    the length-sorted batches `dupfast.detect` reads, so a run matches the API over those batches."""
    import torch

    from ..batches import Rows
    from ..batching import length_sorted_batches

    tokens = tok(list(texts), truncation=True, max_length=max_len)["input_ids"]
    order = [i for b in length_sorted_batches([len(t) for t in tokens], max(len(tokens), 1), False) for i in b]
    return Rows([tokens[i] for i in order], None,
                None if labels is None else torch.as_tensor([labels[i] for i in order], dtype=torch.long),
                torch.as_tensor([ids[i] for i in order], dtype=torch.long))


def padded_batches(tok, rows, batch_size: int):
    """Rows -> padded batches for `dupfast.detect`, `index` = the rows' global ids."""
    from ..batching import RowBatcher

    out = []
    for b in RowBatcher.from_rows(tok, rows).batches(batch_size):
        b["index"] = rows.index[b["index"]]
        out.append(b)
    return out


def run(args):
    import torch

    from .. import distributed as dist
    from ..purification import PurifyConfig, parse_overrides, purify
    from ..tables import read_table
    from .outdir import clear_outputs, prepare_out

    if args.flags and args.detector:
        raise ValueError("--flags and --detector both say which rows to unlearn: pass one (--detector flags the "
                         "suspect set with a saved detector, --flags gives the flags themselves)")
    out = prepare_out(args.out, args.overwrite, OUTPUTS)  # a file, or an earlier run's folder: before any work
    overrides = parse_overrides(args.set)
    for key in ("lambda_asr", "lambda_acc", "epochs", "lr", "batch_size", "seed"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.no_lora:
        overrides["use_lora"] = False
    cfg = PurifyConfig(**overrides)  # validate before loading anything heavy
    if args.save_adapters and not cfg.use_lora:
        raise ValueError("--save-adapters saves the LoRA adapters, but --no-lora (use_lora=false) trains every "
                         "weight without adapters: drop one of them")

    # the suspect set's labels are never read: string labels (a file `dupfast screen` took) must not stop it
    suspect_table = read_table(args.suspect, args.text_column, role="the suspect set", raw_labels=True)
    suspect = suspect_table.texts
    clean_table = read_table(args.clean, args.text_column, args.label_column, need_labels=True, role="the clean set",
                             raw_labels=True)
    # names mapped to class ids before any model loads (purify checks the ids against the classifier's head)
    clean_texts = clean_table.texts
    clean_labels = label_ids(clean_table, *label_names(args.label_map, model_config(args.model), args.model), None)
    flags = read_flags(args.flags, len(suspect), suspect, suspect_table.text_column) if args.flags else None
    # a saved detector is checked (files, checksums) before any model is loaded
    saved = None
    if args.detector:
        from ..detection import Detector
        saved = Detector.load(args.detector)
    distributed = dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    torch.set_num_threads(args.threads)
    model, tok = load_classifier(args.model, args.num_labels)
    # texts -> token rows once; rank-strided shards whose `index` keeps the global row id, so flags index the
    # whole suspect set
    mine, cmine = list(range(rank, len(suspect), world)), list(range(rank, len(clean_texts), world))
    pool = token_rows(tok, [suspect[i] for i in mine], None, args.max_len, mine)
    clean = token_rows(tok, [clean_texts[i] for i in cmine], [clean_labels[i] for i in cmine], args.max_len, cmine)
    if flags is None:
        import dupfast
        # detection's forward passes: a bar per pass on rank 0 (when bars are on)
        pool_batches = with_bar(padded_batches(tok, pool, cfg.batch_size), "detect pool", enabled=rank == 0)
        if saved is not None:
            detection = dupfast.detect(model, pool_batches, detector=saved)
        else:
            clean_batches = with_bar(padded_batches(tok, clean, cfg.batch_size), "detect clean", enabled=rank == 0)
            detection = dupfast.detect(model, pool_batches, clean=clean_batches)
        if rank == 0:
            print(f"dupfast purify: {detection.summary}", file=sys.stderr)
    else:
        detection = torch.as_tensor(flags, dtype=torch.bool)
    purified, report = purify(model, pool, clean=clean, detection=detection, config=cfg, force=args.force,
                              tokenizer=tok, triggers=trigger_option(args.triggers))
    if rank == 0:
        adapters = None
        if args.save_adapters:  # the model as given, loaded again: the adapters are the change from it
            adapters, worst = lora_adapters(load_classifier(args.model, args.num_labels)[0], purified, cfg)
        clear_outputs(out, OUTPUTS)  # the results exist: only now replace an earlier run's
        purified.save_pretrained(str(out / "model"), safe_serialization=True)
        tok.save_pretrained(str(out / "model"))
        if adapters is not None:
            adapters.save_pretrained(str(out / "adapters"), safe_serialization=True)
        report.save(out / "purify_report.json")
        _write_report(out, report.to_dict(), args, detection, len(suspect), None if adapters is None else worst)
        sel = report.selected or {}
        print(json.dumps({"flagged": report.data.get("flagged"), "stop_reason": report.stop_reason,
                          "selected_step": sel.get("step"), "heldout_flag_agreement": sel.get("agree"),
                          "heldout_clean_acc": sel.get("acc"), "seconds": report.timings.get("total_s"),
                          "model": str(out / "model"), "report": str(out / "purify_report.json"),
                          "report_md": str(out / "report.md")}))
    if distributed:
        import torch.distributed as torch_dist
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return 0


def trigger_option(value: str):
    """--triggers: "auto" (dupfast.triggers on the suspect rows), "none", or comma-separated words / phrases."""
    if value.strip().lower() == "auto":
        return "auto"
    if value.strip().lower() == "none":
        return None
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise ValueError(f"--triggers expects auto, none or comma-separated words, got {value!r}")
    return words


def lora_adapters(original, purified, cfg):
    """(peft model, largest weight error): LoRA adapters on `original` (the model as given) that turn it into
    `purified`, with the same targets, rank and head copy as purify's. purify merges its adapters into the weights, so
    they are recovered from the merged ones: each adapted layer's change B·A·scaling has rank <= lora_r, and its
    truncated SVD gives it back up to float rounding; the head's new weights are peft's modules_to_save."""
    import torch

    from ..purification.lora import attach_lora, head_names

    heads = head_names(original) if cfg.train_head else []
    student, _, targets = attach_lora(original, cfg)  # wraps `original` in place
    inner, worst = student.base_model.model, 0.0
    with torch.no_grad():
        for name in targets:
            layer, merged = inner.get_submodule(name), purified.get_submodule(name).weight
            w0 = layer.base_layer.weight
            u, s, vh = torch.linalg.svd((merged - w0).double(), full_matrices=False)
            k = min(layer.r["default"], s.numel())  # a layer narrower than the rank: the rest stays zero
            root = (s[:k] / layer.scaling["default"]).sqrt()
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.zero_()
            b.zero_()
            b[:, :k] = u[:, :k] * root
            a[:k] = root[:, None] * vh[:k]
            worst = max(worst, float((w0 + layer.get_delta_weight("default") - merged).abs().max()))
        for head in heads:
            getattr(inner, head).modules_to_save["default"].load_state_dict(getattr(purified, head).state_dict())
    if worst > 1e-4:  # a change of rank > lora_r is not purify's LoRA change: say so rather than save a wrong one
        raise ValueError(f"the purified model's change to MODEL is not a rank-{cfg.lora_r} LoRA change (weight error "
                         f"{worst:.2g}): was MODEL changed on disk during the run? rerun without --save-adapters")
    return student.eval(), worst


def _write_report(out, rep: dict, args, detection, n_rows, adapter_error):
    from . import report

    if args.flags:
        n = int(sum(bool(f) for f in detection))
        gate = [f"The flags of {report.code(args.flags)}: {n:,} of {n_rows:,} suspect rows flagged, used as given (no "
                "verdict gates given flags)."]
    else:
        how = (f"the saved detector {report.code(args.detector)}" if args.detector
               else f"a detector fitted on the clean set {report.code(args.clean)}")
        gate = report.detection_gate(args.suspect, how, detection, args.force)
    if adapter_error is not None:
        gate.append(f"`adapters/`: the LoRA adapters of this change (recovered from the merged weights; largest "
                    f"weight error {adapter_error:.1g}).")
    report.write_purify(out, rep, args.model, gate, FILES)


PURIFY_DEFAULTS = {"lambda_asr": 1.0, "lambda_acc": 1.0, "epochs": 12, "lr": 5e-4, "batch_size": 32, "seed": 2025}


def add_parser(subparsers):
    ap = subparsers.add_parser("purify", help="detection-guided LoRA unlearning of a backdoored classifier",
                               description=synopsis(__doc__),
                               example="dupfast purify runs/victim --suspect pool.csv --clean dev.tsv "
                                       "--flags runs/detect/scores.csv --out runs/purify")
    ap.add_argument("model", help="the fine-tuned classifier: a local HF folder, or a short name holding a head")
    ap.add_argument("--suspect", required=True, help="the suspicious pool (.csv, .tsv, .jsonl or .txt)")
    ap.add_argument("--clean", required=True, help="the defender's labelled clean set (.csv, .tsv or .jsonl)")
    ap.add_argument("--text-column", help="the text column's name (default: inferred, see dupfast.tables)")
    ap.add_argument("--label-column", help="the clean set's label column (default: inferred)")
    add_label_map(ap)
    ap.add_argument("--out", required=True, help="output folder: model/, purify_report.json, report.md (new or "
                                                 "empty, or --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier run's results in --out (only the files this command writes)")
    ap.add_argument("--flags", help="flags of the suspect rows: detect's scores.csv, screen's flagged.csv or "
                                    "kept.csv, a JSON list or one 0/1 a line (default: run dupfast.detect)")
    ap.add_argument("--detector", help="a detector folder saved by `dupfast detect` or `dupfast screen` "
                                       "(OUT/detector): flag the suspect set with it instead of fitting one")
    ap.add_argument("--num-labels", type=positive_int, help="the classifier's label count (default: its own; a "
                                                             "different value is an error)")
    # None: PurifyConfig's value (or --set's); shown here without importing it (torch), tests/test_cli_help.py
    # holds the two equal
    d = PURIFY_DEFAULTS
    ap.add_argument("--lambda-asr", dest="lambda_asr", type=float,
                    help=f"weight of the ascent on flagged rows (default: {d['lambda_asr']})")
    ap.add_argument("--lambda-acc", dest="lambda_acc", type=float,
                    help=f"weight of the cross-entropy on clean rows (default: {d['lambda_acc']})")
    ap.add_argument("--epochs", type=positive_int, help=f"unlearning epochs (default: {d['epochs']})")
    ap.add_argument("--lr", type=float, help=f"learning rate (default: {d['lr']})")
    ap.add_argument("--batch-size", dest="batch_size", type=positive_int,
                    help=f"rows per unlearning step and per detection forward pass (default: {d['batch_size']})")
    ap.add_argument("--seed", type=int, help=f"random seed (default: {d['seed']})")
    ap.add_argument("--triggers", default="auto",
                    help="trigger candidates inserted into copies of the clean rows, which must keep their clean "
                         "prediction (the trigger is forgotten, not inverted): auto (default: dupfast.triggers on the "
                         "suspect rows and the flags), none, or comma-separated words / phrases")
    ap.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA (comparisons)")
    ap.add_argument("--force", action="store_true",
                    help="unlearn the flagged rows even when the detection finds no evidence of poison")
    ap.add_argument("--save-adapters", action="store_true",
                    help="also write the LoRA adapters beside the merged model: DIR/adapters (peft, safetensors)")
    ap.add_argument("--max-len", dest="max_len", type=positive_int, default=128,
                    help="tokens per text; longer texts are truncated")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads")
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                    help="any other PurifyConfig field, e.g. --set max_steps=100 agree_bound=0.05")
    add_progress_flags(ap)
    ap.set_defaults(func=run)

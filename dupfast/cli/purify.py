"""`dupfast purify`: detection-guided LoRA unlearning of a backdoored classifier from the command line.

    dupfast purify MODEL --suspect pool.tsv --clean clean.tsv --out DIR [--flags flags.json]
                   [--lambda-asr 1] [--lambda-acc 1] [--epochs 12] [--lr 5e-4] [--no-lora] [--set key=value ...]

MODEL: the fine-tuned (backdoored) classifier: a local HF folder, or a short name (minilm, mpnet-base,
smollm2-135m) only if its folder holds a fine-tuned head (a pretrained encoder is an error).
Text files: .csv, .tsv, .jsonl (columns found by name, `dupfast.tables`: text/sentence/review/... and
label, or --text-column / --label-column; OpenBackdoor dumps `,0,1,2`), or .txt (one text a line, suspect
set only). The clean set must be labelled. Without --flags, `dupfast.detect` flags the suspect
set first. --flags: a JSON list of 0/1 (or {"flags": [...]}) or a text file with one 0/1 per line, one per
suspect row. Writes DIR/model (save_pretrained: safetensors + tokenizer) and DIR/purify_report.json; an
existing DIR with entries is refused before any work unless --overwrite (which replaces only those two).
Under torchrun each process takes every WORLD_SIZE-th row of both sets (rank-strided shards).
"""
import json
import sys
import pathlib

from .argtypes import positive_int


def read_flags(path, n: int):
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such flags file: {p}")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        flags = data.get("flags") if isinstance(data, dict) else data
        if not isinstance(flags, list):
            raise ValueError(f"{p}: expected a JSON list of 0/1 or an object with a 'flags' list")
    else:
        flags = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    values = []
    for i, f in enumerate(flags):
        v = {"0": 0, "1": 1, "false": 0, "true": 1, "False": 0, "True": 1}.get(str(f)) if not isinstance(f, bool) else int(f)
        if v is None:
            raise ValueError(f"{p}: flag {i} is {f!r}; flags must be 0/1 or true/false")
        values.append(v)
    if len(values) != n:
        raise ValueError(f"{p} holds {len(values)} flags but the suspect set has {n} rows")
    return values


OUTPUTS = ("model", "purify_report.json")


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
    own = len(config.get("id2label") or {}) or config.get("num_labels") or 2
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

    out = prepare_out(args.out, args.overwrite, OUTPUTS)  # a file, or an earlier run's folder: before any work
    overrides = parse_overrides(args.set)
    for key in ("lambda_asr", "lambda_acc", "epochs", "lr", "batch_size", "seed"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.no_lora:
        overrides["use_lora"] = False
    cfg = PurifyConfig(**overrides)  # validate before loading anything heavy

    suspect = read_table(args.suspect, args.text_column, role="the suspect set").texts
    clean_table = read_table(args.clean, args.text_column, args.label_column, need_labels=True, role="the clean set")
    clean_texts, clean_labels = clean_table.texts, clean_table.labels
    flags = read_flags(args.flags, len(suspect)) if args.flags else None
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
        detection = dupfast.detect(model, padded_batches(tok, pool, cfg.batch_size),
                                   clean=padded_batches(tok, clean, cfg.batch_size))
        if rank == 0:
            print(f"dupfast purify: {detection.summary}", file=sys.stderr)
    else:
        detection = torch.as_tensor(flags, dtype=torch.bool)
    purified, report = purify(model, pool, clean=clean, detection=detection, config=cfg, force=args.force)
    if rank == 0:
        clear_outputs(out, OUTPUTS)  # the results exist: only now replace an earlier run's
        purified.save_pretrained(str(out / "model"), safe_serialization=True)
        tok.save_pretrained(str(out / "model"))
        report.save(out / "purify_report.json")
        sel = report.selected or {}
        print(json.dumps({"flagged": report.data.get("flagged"), "stop_reason": report.stop_reason,
                          "selected_step": sel.get("step"), "heldout_flag_agreement": sel.get("agree"),
                          "heldout_clean_acc": sel.get("acc"), "seconds": report.timings.get("total_s"),
                          "model": str(out / "model"), "report": str(out / "purify_report.json")}))
    if distributed:
        import torch.distributed as torch_dist
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return 0


def add_parser(subparsers):
    ap = subparsers.add_parser("purify", help="detection-guided LoRA unlearning of a backdoored classifier",
                               description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the fine-tuned classifier: a local HF folder, or a short name holding a head")
    ap.add_argument("--suspect", required=True, help="the suspicious pool (.csv, .tsv, .jsonl or .txt)")
    ap.add_argument("--clean", required=True, help="the defender's labelled clean set (.csv, .tsv or .jsonl)")
    ap.add_argument("--text-column", help="the text column's name (default: inferred, see dupfast.tables)")
    ap.add_argument("--label-column", help="the clean set's label column (default: inferred)")
    ap.add_argument("--out", required=True, help="output folder: model/ and purify_report.json (new or empty, or "
                                                 "--overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier run's results in --out (only model/ and purify_report.json)")
    ap.add_argument("--flags", help="detector flags for the suspect rows (JSON list or one 0/1 a line); "
                                    "default: run dupfast.detect")
    ap.add_argument("--num-labels", type=positive_int, help="the classifier's label count (default: its own; a "
                                                             "different value is an error)")
    ap.add_argument("--lambda-asr", dest="lambda_asr", type=float)
    ap.add_argument("--lambda-acc", dest="lambda_acc", type=float)
    ap.add_argument("--epochs", type=positive_int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", dest="batch_size", type=positive_int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA (comparisons)")
    ap.add_argument("--force", action="store_true",
                    help="unlearn the flagged rows even when the detection finds no evidence of poison")
    ap.add_argument("--max-len", dest="max_len", type=positive_int, default=128)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="any other PurifyConfig field")
    ap.set_defaults(func=run)

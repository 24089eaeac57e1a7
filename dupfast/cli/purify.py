"""`dupfast purify`: detection-guided LoRA unlearning of a backdoored classifier from the command line.

    dupfast purify MODEL --suspect pool.tsv --clean clean.tsv --out DIR [--flags flags.json]
                   [--lambda-asr 1] [--lambda-acc 1] [--epochs 12] [--lr 5e-4] [--no-lora] [--set key=value ...]

MODEL: a short name (minilm, mpnet-base, smollm2-135m) or a local HF model folder (a fine-tuned classifier).
Text files: .csv, .tsv, .jsonl (columns found by name, `dupfast.tables`: text/sentence/review/... and
label, or --text-column / --label-column; OpenBackdoor dumps `,0,1,2`), or .txt (one text a line, suspect
set only). The clean set must be labelled. Without --flags, `dupfast.detect` flags the suspect
set first. --flags: a JSON list of 0/1 (or {"flags": [...]}) or a text file with one 0/1 per line, one per
suspect row. Writes DIR/model (save_pretrained: safetensors + tokenizer) and DIR/purify_report.json.
Under torchrun each process takes every WORLD_SIZE-th row of both sets (rank-strided shards).
"""
import dataclasses
import json
import pathlib


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


def _parse_set(items):
    """--set key=value overrides for PurifyConfig, typed by the field's annotation."""
    from ..purify import PurifyConfig

    fields = {f.name: str(f.type) for f in dataclasses.fields(PurifyConfig)}
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in fields:
            raise ValueError(f"--set: unknown PurifyConfig field {key!r}; fields: {sorted(fields)}")
        kind = fields[key]
        try:
            if raw.lower() == "none" and "Optional" in kind:
                out[key] = None
            elif "bool" in kind:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"expected true/false, got {raw!r}")
                out[key] = raw.lower() in ("true", "1")
            elif "int" in kind:
                out[key] = int(raw)
            elif "float" in kind:
                out[key] = float(raw)
            elif "tuple" in kind:
                out[key] = tuple(raw.split(","))
            else:
                out[key] = raw
        except ValueError as exc:
            raise ValueError(f"--set {key}: {exc}") from None
    return out


def run(args):
    import torch

    from .. import distributed as dist
    from .. import purify as purify_mod
    from ..batching import TextBatcher
    from ..models import load_model
    from ..tables import read_table

    distributed = dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    torch.set_num_threads(args.threads)
    overrides = _parse_set(args.set)
    for key in ("lambda_asr", "lambda_acc", "epochs", "lr", "batch_size", "seed"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.no_lora:
        overrides["use_lora"] = False
    cfg = purify_mod.PurifyConfig(**overrides)  # validate before loading anything heavy

    suspect = read_table(args.suspect, args.text_column, role="the suspect set").texts
    clean_table = read_table(args.clean, args.text_column, args.label_column, need_labels=True, role="the clean set")
    clean_texts, clean_labels = clean_table.texts, clean_table.labels
    flags = read_flags(args.flags, len(suspect)) if args.flags else None
    model, tok = load_model(args.model, num_labels=max(clean_labels) + 1 if args.num_labels is None else args.num_labels)
    model.eval()

    # rank-strided shards; `index` keeps the global row id, so flags index the whole suspect set
    mine = list(range(rank, len(suspect), world))
    pool = TextBatcher(tok, [suspect[i] for i in mine], None, args.max_len)
    cmine = list(range(rank, len(clean_texts), world))
    clean = TextBatcher(tok, [clean_texts[i] for i in cmine], [clean_labels[i] for i in cmine], args.max_len)
    gid = torch.as_tensor(mine)

    def pool_batches():
        for b in pool.batches(args.batch_size or 32):
            b["index"] = gid[b["index"]]
            yield b

    pool_loader = list(pool_batches())
    clean_loader = list(clean.batches(args.batch_size or 32))
    if flags is None:
        import dupfast
        detection = dupfast.detect(model, pool_loader, clean=clean_loader)
    else:
        detection = torch.as_tensor(flags, dtype=torch.bool)
    purified = purify_mod.purify(model, pool_loader, clean=clean_loader, detection=detection, config=cfg)
    report = purified.dupfast_report
    out = pathlib.Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
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
    ap.add_argument("model", help="short name (minilm, mpnet-base, smollm2-135m) or a local HF classifier folder")
    ap.add_argument("--suspect", required=True, help="the suspicious pool (.csv, .tsv, .jsonl or .txt)")
    ap.add_argument("--clean", required=True, help="the defender's labelled clean set (.csv, .tsv or .jsonl)")
    ap.add_argument("--text-column", help="the text column's name (default: inferred, see dupfast.tables)")
    ap.add_argument("--label-column", help="the clean set's label column (default: inferred)")
    ap.add_argument("--out", required=True, help="output folder: model/ and purify_report.json")
    ap.add_argument("--flags", help="detector flags for the suspect rows (JSON list or one 0/1 a line); "
                                    "default: run dupfast.detect")
    ap.add_argument("--num-labels", type=int, help="label count (default: max clean label + 1)")
    ap.add_argument("--lambda-asr", dest="lambda_asr", type=float)
    ap.add_argument("--lambda-acc", dest="lambda_acc", type=float)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", dest="batch_size", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA (comparisons)")
    ap.add_argument("--max-len", dest="max_len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="any other PurifyConfig field")
    ap.set_defaults(func=run)

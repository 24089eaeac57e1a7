"""Victims, detection and purification per architecture on SST-2 (20% dirty label), the MiniLM protocol.

    python -m experiments.sst2_architectures --model mpnet-base [--attacks badnets addsent stylebkd]
        [--train-size 2000] [--epochs 1] [--lr 5e-5] [--batch-size 16] [--autocast bf16|none]
        [--no-strip] [--purify] [--bf16-detect] [--out runs/arch]

Per model: a clean fine-tune and one victim per attack, trained by the `victims` recipe on a seeded subset of
the DUP release's poisoned SST-2 train file (`--train-size` rows, the file's 20% poison rate kept in
expectation) and, for the clean fine-tune, of the clean train split; both cached by content hash. CACC on the
clean test split, ASR / floor on the test-poison split. Detection: the defender's clean set / pool of
`experiments/protocol.py`, `dupfast.detect` in modes dup (authors, exact), dan and default, plus STRIP; AUROC,
FAR at the calibrated threshold, FRR on the pool's clean half. Speed: `dupfast.detect` (default mode, pool +
clean set) against a bare forward pass of the same model over the same batches, in the same process.
`--purify`: `dupfast.purify` from the default mode's flags, CACC / ASR / floor after, time as a ratio to one
epoch of the victim's fine-tuning (measured in this process when the victim is not cached).
Rows go to <out>/<model>.jsonl; the markdown table is printed at the end.
"""
import argparse
import json
import pathlib
import sys
import time

import torch

from dupfast.batching import TextBatcher
from dupfast.harness import metrics
from dupfast.harness.data import load_sst2, load_sst2_poison, split_samples
from dupfast.harness.victims import VictimConfig, train_victim
from experiments.protocol import sst2_clean_and_pool
from experiments.sst2_victims import evaluate

MAX_LEN, BATCH, SPLIT_SEED = 64, 32, 2025
NAMES = {"dup": "DUP (authors)", "dan": "DAN", "default": "dupfast default", "strip": "STRIP"}


def subset(samples, n, seed=SPLIT_SEED):
    return samples if n >= len(samples) else split_samples(samples, [n], seed=seed)[0]


def victim_config(model_name, epochs=1, lr=5e-5, batch_size=16, autocast="bf16") -> VictimConfig:
    """The per-architecture victim recipe (the defaults are this script's); other experiments build it here
    to hit the same cached victims."""
    return VictimConfig(model=model_name, epochs=epochs, lr=lr, batch_size=batch_size, max_len=MAX_LEN,
                        seed=SPLIT_SEED, autocast=autocast)


def victim_train(attack, n):
    """The victim's training set: a seeded n-row subset of the 20%-dirty file (attack None: the clean split)."""
    return subset(load_sst2("train") if attack is None else load_sst2_poison(attack, "train", 0.2), n)


def victim_name(model_name, attack, n):
    """Cache folder name: the short name (or a model folder's last part), the attack and the subset size."""
    tag = pathlib.Path(str(model_name)).name
    return f"sst2-{tag}-clean-n{n}" if attack is None else f"sst2-{tag}-{attack}-dirty0.2-n{n}"


def victim_cached(model_name, attack, cfg, n) -> bool:
    """Whether `victim` would load from the cache rather than train."""
    from dupfast.harness.victims import cache_key, default_cache_dir

    train = victim_train(attack, n)
    folder = default_cache_dir() / "victims" / f"{victim_name(model_name, attack, n)}-{cache_key(cfg, train, 2)}"
    return (folder / "dupfast_victim.json").is_file()


def victim(model_name, attack, cfg, n):
    """(model, tokenizer, info) of the victim (attack) or the clean fine-tune (attack None)."""
    return train_victim(victim_train(attack, n), cfg, name=victim_name(model_name, attack, n))


def loaders(tok, clean_set, pool):
    pool_loader = list(TextBatcher(tok, [s.text for s in pool], None, MAX_LEN).batches(BATCH))
    clean_loader = list(TextBatcher(tok, [s.text for s in clean_set], [s.label for s in clean_set],
                                    MAX_LEN).batches(BATCH))
    return pool_loader, clean_loader


def bare_forward_seconds(model, batches):
    takes = ("input_ids", "attention_mask")
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**{k: b[k] for k in takes})
    return time.perf_counter() - t0


def detection_rows(model, tok, attack, strip, bf16_detect=False):
    import dupfast
    from dupfast.detection import StripDetector

    clean_set, pool = sst2_clean_and_pool(attack, None, SPLIT_SEED)
    pool_loader, clean_loader = loaders(tok, clean_set, pool)
    truth = torch.tensor([s.poison_label for s in pool]).bool()  # evaluation only
    rows, flags = [], None
    model.eval()
    bare = bare_forward_seconds(model, pool_loader + clean_loader)
    for mode in ("dup", "dan", "default"):
        t0 = time.perf_counter()
        res = dupfast.detect(model, pool_loader, clean=clean_loader, mode=mode)
        seconds = time.perf_counter() - t0
        res = res.sorted_by_index()
        rep = metrics.detection_report(truth, res.flags, res.scores)
        rows.append({"method": NAMES[mode], "auroc": rep["auroc"], "far": rep["far"], "frr": rep["frr"],
                     "detect_s": round(seconds, 2), "bare_forward_s": round(bare, 2),
                     "forward_over_detect": round(bare / seconds, 3)})
        if mode == "default":
            flags = torch.as_tensor(res.flags).bool()
    if bf16_detect:
        # the same default-mode call under bf16 autocast: speed-up over fp32 and AUROC change (issue 16)
        t0 = time.perf_counter()
        res = dupfast.detect(model, pool_loader, clean=clean_loader, mode="default", autocast="bf16")
        seconds = time.perf_counter() - t0
        rep = metrics.detection_report(truth, res.sorted_by_index().flags, res.sorted_by_index().scores)
        fp32 = next(r for r in rows if r["method"] == NAMES["default"])
        rows.append({"method": NAMES["default"] + " (bf16 autocast)", "auroc": rep["auroc"], "far": rep["far"],
                     "frr": rep["frr"], "detect_s": round(seconds, 2), "bare_forward_s": round(bare, 2),
                     "forward_over_detect": round(bare / seconds, 3),
                     "speedup_over_fp32": round(fp32["detect_s"] / seconds, 3),
                     "auroc_change": rep["auroc"] - fp32["auroc"]})
    if strip:
        st = StripDetector(frr=0.05, max_len=MAX_LEN).fit(model, tok, [s.text for s in clean_set])
        r = st.score(model, tok, [s.text for s in pool])
        rep = metrics.detection_report(truth, r.flags, r.scores)
        rows.append({"method": NAMES["strip"], "auroc": rep["auroc"], "far": rep["far"], "frr": rep["frr"]})
    return rows, (pool_loader, clean_loader, flags)


def purify_row(model, tok, attack, data, epoch_s):
    import dupfast

    pool_loader, clean_loader, flags = data
    t0 = time.perf_counter()
    purified, report = dupfast.purify(model, pool_loader, clean=clean_loader, detection=flags)
    seconds = time.perf_counter() - t0
    after = evaluate(purified, tok, attack, max_len=MAX_LEN)
    return {"cacc_after": after["cacc"], "asr_after": after["asr"], "asr_floor_after": after["asr_floor"],
            "steps": report.steps_run, "selected_step": (report.selected or {}).get("step"),
            "stop_reason": report.stop_reason, "purify_s": round(seconds, 1),
            "ratio_to_epoch": round(seconds / epoch_s, 3) if epoch_s else None}


def table(rows):
    lines = ["| model | attack | victim CACC / ASR (floor) | clean fine-tune CACC | method | AUROC | FAR | FRR | "
             "forward / detect |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["victim"]
        for m in r["detection"]:
            ratio = f"{m['forward_over_detect']:.2f}" if "forward_over_detect" in m else "-"
            lines.append(f"| {r['model']} | {r['attack']} | {v['cacc']:.3f} / {v['asr']:.3f} ({v['asr_floor']:.3f}) | "
                         f"{r['clean_cacc']:.3f} | {m['method']} | {m['auroc']:.4f} | {m['far']:.3f} | "
                         f"{m['frr']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="short model name (dupfast.harness.models): mpnet-base, "
                                                    "smollm2-135m, gemma3-270m, minilm")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--autocast", choices=["bf16", "none"], default="bf16",
                    help="train under bf16 autocast (fast on CPUs with native bf16); 'none' for fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-strip", action="store_true")
    ap.add_argument("--purify", action="store_true")
    ap.add_argument("--bf16-detect", action="store_true",
                    help="also time the default mode under bf16 autocast (speed-up over fp32, AUROC change)")
    ap.add_argument("--out", default="runs/arch")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = victim_config(args.model, args.epochs, args.lr, args.batch_size, None if args.autocast == "none" else "bf16")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{args.model}.jsonl"
    cm, ctok, cinfo = victim(args.model, None, cfg, args.train_size)
    clean_eval = evaluate(cm, ctok, args.attacks[0], max_len=MAX_LEN)
    del cm
    print(json.dumps({"clean_fine_tune": clean_eval, "train_seconds": cinfo["train_seconds"],
                      "cached": cinfo["cached"]}), flush=True)
    rows = []
    for attack in args.attacks:
        model, tok, info = victim(args.model, attack, cfg, args.train_size)
        v = evaluate(model, tok, attack, max_len=MAX_LEN)
        det, data = detection_rows(model, tok, attack, strip=not args.no_strip, bf16_detect=args.bf16_detect)
        row = {"model": args.model, "attack": attack, "recipe": {**cfg.__dict__, "train_size": args.train_size},
               "victim": v, "victim_train_s": info["train_seconds"], "victim_cached": info["cached"],
               "clean_cacc": clean_eval["cacc"], "clean_asr_floor": clean_eval["asr_floor"], "detection": det,
               "threads": torch.get_num_threads()}
        if args.purify:
            epoch_s = None if info["cached"] else info["train_seconds"] / cfg.epochs
            row["purify"] = purify_row(model, tok, attack, data, epoch_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

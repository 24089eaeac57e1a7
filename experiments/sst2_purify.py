"""Purification quality on the SST-2 MiniLM victims (20% dirty-label BadNets, AddSent, StyleBkd).

    python -m experiments.sst2_purify [--attacks badnets addsent stylebkd]
        [--variants default lora_clean full_ft authors] [--detect-mode default] [--set key=value ...]
        [--out runs/purify.jsonl]

Protocol (the defender's side): clean set = one half of the clean SST-2 dev split; pool = the other half +
dev-poison; flags = `dupfast.detect(victim, pool, clean=clean set)`. The defence sees only the pool, the
flags and the clean set. CACC (SST-2 test) and ASR (test-poison) are computed only afterwards, to evaluate.

Variants: (a) default = dupfast's defaults; (b) lora_clean = λ_asr 0 (clean LoRA fine-tuning, the authors'
committed setting); (c) full_ft = plain full fine-tuning on the clean set (lr 5e-5, as the victims were
trained); (b) and (c) run exactly the steps (a) ran, without early stopping or selection. authors = the authors' recipe (λ_asr 1, unbounded
ascent, 5 epochs, no stopping rule) for reference.
"""
import argparse
import json
import pathlib
import sys
import time

import torch


from dupfast.harness import metrics
from experiments.protocol import sst2_clean_and_pool
from dupfast.batching import TextBatcher

MAX_LEN, BATCH, SPLIT_SEED, TARGET = 64, 32, 2025, 1
VARIANTS = {
    "default": {},
    "lora_clean": {"lambda_asr": 0.0, "lambda_keep": 0.0},  # CE on the clean set only
    "full_ft": {"use_lora": False, "lambda_asr": 0.0, "lambda_keep": 0.0, "lr": 5e-5},  # the victim recipe's lr
    "authors": {"lambda_asr": 1.0, "lambda_keep": 0.0, "kl_cap": None, "start": "tie", "temperature": 1.0,
                "epochs": 5, "early_stop": False, "select_best": False},
}
SAME_STEPS = ("lora_clean", "full_ft")  # run for the steps the default ran, no stop/selection


def victim_ready(attack: str, log="runs/victims.log") -> bool:
    """The lead's victim script writes one JSON line per finished attack; loading earlier would start a
    duplicate training run."""
    p = pathlib.Path(log)
    if not p.is_file():
        return False
    for line in p.read_text(errors="replace").replace("\r", "\n").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                if attack in json.loads(line):
                    return True
            except json.JSONDecodeError:
                continue
    return False


def protocol(attack: str, data_dir=None):
    """(defender's clean set, pool samples)."""
    return sst2_clean_and_pool(attack, data_dir, SPLIT_SEED)


def loaders(tok, clean_set, pool):
    pool_loader = list(TextBatcher(tok, [s.text for s in pool], None, MAX_LEN).batches(BATCH))
    clean_loader = list(TextBatcher(tok, [s.text for s in clean_set], [s.label for s in clean_set],
                                    MAX_LEN).batches(BATCH))
    return pool_loader, clean_loader


def detect(model, pool_loader, clean_loader, mode):
    import dupfast
    t0 = time.perf_counter()
    result = dupfast.detect(model, pool_loader, clean=clean_loader) if mode == "default" else \
        dupfast.detect(model, pool_loader, clean=clean_loader, mode=mode)
    return result, time.perf_counter() - t0


def evaluate(model, tok, attack, data_dir=None):
    from experiments.sst2_victims import evaluate as victim_eval
    return victim_eval(model, tok, attack, data_dir, max_len=MAX_LEN)


def run_attack(attack, variants, overrides, detect_mode, data_dir, out, flags_cache=False, skip_test_eval=False,
               train_victim=False):
    import dupfast
    from experiments.sst2_victims import victim_for

    if not train_victim and not victim_ready(attack):
        raise SystemExit(f"victim {attack} is not trained yet (no JSON line for it in runs/victims.log); "
                         "pass --train-victim to train it in this run")
    model, tok, info = victim_for(attack, data_dir=data_dir)
    # one epoch of the victim's fine-tuning; measured in this same process when the victim was not cached
    epoch_seconds = info["train_seconds"] / info["config"]["epochs"]
    epoch_measured_here = not info["cached"]
    clean_set, pool = protocol(attack, data_dir)
    pool_loader, clean_loader = loaders(tok, clean_set, pool)
    before_cache = pathlib.Path(out).parent / f"before-{attack}.json"
    if before_cache.is_file() and json.loads(before_cache.read_text())["victim"] == info["path"]:
        before = json.loads(before_cache.read_text())["before"]
    else:
        before = evaluate(model, tok, attack, data_dir)
        before_cache.write_text(json.dumps({"victim": info["path"], "before": before}))
    cache = pathlib.Path(out).parent / f"flags-{attack}-{detect_mode}.json"
    if flags_cache and cache.is_file() and json.loads(cache.read_text())["victim"] == info["path"]:
        saved = json.loads(cache.read_text())  # flags of this same victim and pool, from an earlier run
        flags, scores, detect_s = torch.tensor(saved["flags"]).bool(), torch.tensor(saved["scores"]), saved["detect_s"]
    else:
        result, detect_s = detect(model, pool_loader, clean_loader, detect_mode)
        result = result.sorted_by_index() if getattr(result, "index", None) is not None else result
        flags, scores = torch.as_tensor(result.flags).bool(), torch.as_tensor(result.scores)
        cache.write_text(json.dumps({"victim": info["path"], "flags": flags.int().tolist(),
                                     "scores": scores.tolist(), "detect_s": detect_s}))
    truth = torch.tensor([s.poison_label for s in pool]).bool()  # evaluation only
    det = metrics.detection_report(truth, flags, scores)
    print(json.dumps({"attack": attack, "before": before, "detection": det, "detect_s": round(detect_s, 1),
                      "victim": {k: info[k] for k in ("train_seconds", "cached", "path")}}), flush=True)
    default_steps = None
    rows = []
    for name in variants:
        if name in VARIANTS:
            cfg = dict(VARIANTS[name])
            cfg.update(overrides if name == "default" else {})
        else:  # a sweep point "label:key=value,key=value" on top of the defaults
            label, _, items = name.partition(":")
            cfg = {**overrides, **parse_set([kv for kv in items.split(",") if kv])}
            name = label
        if name in SAME_STEPS:
            if default_steps is None:
                raise SystemExit(f"variant {name} runs the default's steps: list 'default' before it")
            cfg.update(max_steps=default_steps, early_stop=False, select_best=False)
        model, tok, _ = victim_for(attack, data_dir=data_dir)  # a fresh copy: purify works in place
        t0 = time.perf_counter()
        purified, report = dupfast.purify(model, pool_loader, clean=clean_loader, detection=flags, **cfg)
        seconds = time.perf_counter() - t0
        if name == "default":
            default_steps = report.steps_run
        # the selection may keep the input model (step 0): its numbers are the "before" ones
        if skip_test_eval:  # trajectory-only sweep points (e.g. the step-0 tie study)
            after = {"cacc": float("nan"), "asr": float("nan")}
        elif report.changed or not cfg.get("select_best", True):
            after = evaluate(purified, tok, attack, data_dir)
        else:
            after = dict(before)
        row = {"attack": attack, "variant": name, "overrides": cfg, "detect_mode": detect_mode,
               "cacc_before": before["cacc"], "cacc_after": after["cacc"],
               "asr_before": before["asr"], "asr_after": after["asr"],
               "asr_floor_before": before.get("asr_floor"), "asr_floor_after": after.get("asr_floor"),
               "purify_s": round(seconds, 1), "epoch_s": round(epoch_seconds, 1),
               "ratio_to_epoch": round(seconds / epoch_seconds, 3), "epoch_measured_here": epoch_measured_here,
               "threads": torch.get_num_threads(), "detect_s": round(detect_s, 1),
               "steps": report.steps_run, "selected_step": (report.selected or {}).get("step"),
               "stop_reason": report.stop_reason, "tie": report.tie, "teacher": report.teacher,
               "flagged": report.data.get("flagged"), "detection": det, "history": report.history,
               "timings": report.timings}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("attack", "variant", "cacc_before", "cacc_after", "asr_before",
                                                "asr_after", "purify_s", "ratio_to_epoch", "steps",
                                                "selected_step", "stop_reason")}), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return rows


def table(rows) -> str:
    lines = ["| attack | variant | ASR before → after | CACC before → after | steps (kept) | purify s | × epoch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['variant']} | {100 * r['asr_before']:.1f}% → {100 * r['asr_after']:.1f}% "
                     f"| {100 * r['cacc_before']:.2f} → {100 * r['cacc_after']:.2f} | {r['steps']} "
                     f"({r['selected_step']}) | {r['purify_s']:.0f} | {r['ratio_to_epoch']:.2f} |")
    return "\n".join(lines)


def parse_set(items):
    from dupfast.purification import parse_overrides
    return parse_overrides(items)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--variants", nargs="+", default=["default", "lora_clean", "full_ft"],
                    help=f"{list(VARIANTS)} or sweep points 'label:key=value,key=value' (PurifyConfig fields)")
    ap.add_argument("--detect-mode", default="default", help="dupfast.detect mode ('default' = its default)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="PurifyConfig overrides (default)")
    ap.add_argument("--flags-cache", action="store_true",
                    help="reuse the detector's flags saved by an earlier run for the same victim (sweeps)")
    ap.add_argument("--skip-test-eval", action="store_true",
                    help="no CACC/ASR after purification (trajectory-only sweeps; the table needs them)")
    ap.add_argument("--train-victim", action="store_true",
                    help="train the victim here if it is not cached, so its epoch time (the ratio's unit) is "
                         "measured in the same process as the purification (the CPU's load may still differ)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (victim training and purification)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/purify.jsonl")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for attack in args.attacks:
        rows += run_attack(attack, args.variants, parse_set(args.set), args.detect_mode, args.data_dir, args.out,
                           args.flags_cache, args.skip_test_eval, args.train_victim)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does purification leave a clean model? The repair on the SST-2 MiniLM victims, measured on every class.

    python -m experiments.sst2_repair [--attacks badnets addsent] [--variants default invariance ...]
        [--relearn-k 16 64] [--out runs/repair/repair.jsonl]

ASR reads only triggered NON-target inputs; a purification that inverts the trigger (it now pushes toward the
other class: trigger shifting) scores a perfect ASR and breaks every triggered target-class input. So each model
is measured on a triggered copy of the whole SST-2 test split (every class, the attack's own trigger inserted
by the harness): triggered accuracy per class, agreement with a clean fine-tune (the same recipe on clean
SST-2 train) on the same inputs, and shift = ASR − the clean fine-tune's ASR (negative: anti-trigger). Then the
relearning test: each model fine-tuned with one recipe on the defender's clean set + k poisoned rows for a
fixed number of steps, ASR after it.

Rows: the victim, the clean fine-tune, and one per purification variant (defender's protocol as
experiments.sst2_purify: clean set = half of SST-2 dev, pool = the other half + dev-poison, flags from
`dupfast.detect`). Trigger candidates come from `dupfast.triggers` on the pool's texts and flags (never from the
attack's definition): the invariance variants insert what the detection found.
"""
import argparse
import json
import pathlib
import sys
import time

import torch

from dupfast.batching import TextBatcher
from dupfast.harness import repair
from dupfast.harness.attacks import get_attack
from dupfast.harness.data import load_sst2, load_sst2_poison
from dupfast.purification.invariance import insertable
from experiments.protocol import sst2_clean_and_pool

MAX_LEN, BATCH, SPLIT_SEED, TARGET = 64, 32, 2025, 1
# purification variants: PurifyConfig overrides, and whether the detected trigger candidates are inserted into
# the clean rows (purify(triggers=...))
VARIANTS = {
    "default": ({}, False),
    "invariance": ({}, True),
    "invariance_only": ({"lambda_asr": 0.0}, True),        # no ascent at all: the copies alone
    "invariance_cap03": ({"kl_cap": 0.3}, True),           # a tighter bound on the ascent
    "cap03": ({"kl_cap": 0.3}, False),                     # the tighter bound alone
    "invariance_bf16": ({"autocast": "bf16"}, True),       # the copies, student forwards under bf16 autocast
}
ARCH_TRAIN_SIZE = 2000
INSERTABLE = ("badnets", "addsent")  # attacks whose trigger the harness inserts into any text


def clean_finetune():
    """The MiniLM reference: the victims' recipe on clean SST-2 train (cached like the victims)."""
    from dupfast.harness.victims import train_victim
    from experiments.sst2_victims import SST2_VICTIM
    return train_victim(load_sst2("train"), SST2_VICTIM, name="sst2-clean")


def models_for(model_name):
    """(victim(attack), clean fine-tune()) loaders, each returning (model, tokenizer, info): MiniLM's victims of
    experiments.sst2_victims (full SST-2 train), other architectures' of experiments.sst2_architectures (2,000
    rows, 2 epochs, as their table in docs/results/architectures.md)."""
    if model_name == "minilm":
        from experiments.sst2_victims import victim_for
        return victim_for, clean_finetune
    from experiments import sst2_architectures as arch
    cfg = arch.victim_config(model_name, epochs=2)
    return (lambda attack, data_dir=None: arch.victim(model_name, attack, cfg, ARCH_TRAIN_SIZE),
            lambda: arch.victim(model_name, None, cfg, ARCH_TRAIN_SIZE))


EPOCH_SAMPLE = 640


def epoch_seconds(model, tok, info) -> float:
    """One epoch of the victim's own fine-tuning recipe, timed here, in this process: a copy of the model trained
    one epoch on EPOCH_SAMPLE clean SST-2 train rows, scaled to the victim's training-set size (the ratio's unit,
    measured under the same load as the purification)."""
    import copy
    import dataclasses

    from dupfast.finetune import FinetuneConfig, fit
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in info["config"].items() if k in fields})
    cfg = dataclasses.replace(cfg, epochs=1)
    rows = load_sst2("train")[:EPOCH_SAMPLE]
    t0 = time.perf_counter()
    fit(copy.deepcopy(model), tok, rows, cfg, desc="epoch timing")
    return (time.perf_counter() - t0) * info["train_size"] / len(rows)


def candidates_for(model, tok, pool, flags, clean_set):
    """The detection's trigger candidates (words; with the model's flip rate), and the ones inserted."""
    import dupfast
    found = dupfast.triggers([s.text for s in pool], flags.tolist(), model=model, tokenizer=tok,
                             clean_texts=[s.text for s in clean_set], max_len=MAX_LEN)
    return [c.to_dict() for c in found], insertable(found)


def measure(model, tok, attack, test, reference_preds, relearn_k, relearn_rows, seed=0):
    """The repair metrics of one model and its relearning ASRs. StyleBkd's trigger is a paraphrase the harness
    cannot apply (precomputed test-poison only): CACC, ASR and floor on the released files, no per-class copy."""
    t0 = time.perf_counter()
    if attack not in INSERTABLE:
        from experiments.sst2_victims import evaluate
        rep = {**evaluate(model, tok, attack, max_len=MAX_LEN), "per_class": {}, "relearn": [],
               "eval_s": round(time.perf_counter() - t0, 1)}
        return rep
    rep = repair.evaluate_repair(model, tok, test, get_attack(attack), TARGET, reference_preds=reference_preds,
                                 seed=seed, max_len=MAX_LEN)
    rep["eval_s"] = round(time.perf_counter() - t0, 1)
    rep["relearn"] = []
    rep["per_class"] = {str(c): v for c, v in rep["per_class"].items()}  # JSON keys
    clean_rows, train_rows, test_poison = relearn_rows
    for k in relearn_k:
        poison = repair.poison_sample(train_rows, get_attack(attack), k, TARGET, seed=seed)
        rep["relearn"].append(repair.relearn_asr(model, tok, clean_rows, poison, test_poison, TARGET,
                                                 repair.RelearnConfig(seed=seed)))
    return rep


def summary(name, rep) -> dict:
    return {"model": name, "cacc": rep["cacc"], "asr": rep["asr"], "shift": rep.get("shift"),
            "trig_acc": {c: round(v["accuracy"], 4) for c, v in rep["per_class"].items()},
            "agree_ref": rep.get("agreement"),
            "relearn": {r["k"]: round(r["asr"], 4) for r in rep["relearn"]}}


def run_attack(attack, variants, relearn_k, out, data_dir=None, model_name="minilm"):
    import dupfast

    victim_for, clean_model = models_for(model_name)

    test = load_sst2("test", data_dir)
    clean_set, pool = sst2_clean_and_pool(attack, data_dir, SPLIT_SEED)
    relearn_rows = (clean_set, load_sst2("train", data_dir), load_sst2_poison(attack, "test", data_dir=data_dir))
    ref, tok, ref_info = clean_model()
    ref_preds = (repair.triggered_predictions(ref, tok, test, get_attack(attack), TARGET, max_len=MAX_LEN)
                 if attack in INSERTABLE else None)
    rows = [{"attack": attack, "arch": model_name, "model": "clean fine-tune",
             **measure(ref, tok, attack, test, None, relearn_k, relearn_rows)}]
    emit(rows[-1], out)

    victim, tok, info = victim_for(attack, data_dir=data_dir)
    rows.append({"attack": attack, "arch": model_name, "model": "victim",
                 **measure(victim, tok, attack, test, ref_preds, relearn_k, relearn_rows)})
    emit(rows[-1], out)

    pool_loader = list(TextBatcher(tok, [s.text for s in pool], None, MAX_LEN).batches(BATCH))
    clean_loader = list(TextBatcher(tok, [s.text for s in clean_set], [s.label for s in clean_set],
                                    MAX_LEN).batches(BATCH))
    t0 = time.perf_counter()
    result = dupfast.detect(victim, pool_loader, clean=clean_loader).sorted_by_index()
    detect_s = time.perf_counter() - t0
    flags = torch.as_tensor(result.flags).bool()
    found, inserted = candidates_for(victim, tok, pool, flags, clean_set)
    print(json.dumps({"attack": attack, "flagged": int(flags.sum()), "detect_s": round(detect_s, 1),
                      "candidates": found[:6], "inserted": inserted}), flush=True)
    epoch_s = epoch_seconds(victim, tok, info)
    for name in variants:
        overrides, use_triggers = VARIANTS[name]
        if use_triggers and not inserted:
            print(json.dumps({"attack": attack, "variant": name, "skipped": "no usable trigger candidate"}))
            continue
        model, tok, _ = victim_for(attack, data_dir=data_dir)  # a fresh copy: purify works in place
        t0 = time.perf_counter()
        purified, report = dupfast.purify(model, pool_loader, clean=clean_loader, detection=result, tokenizer=tok,
                                          triggers=inserted if use_triggers else None, force=True,
                                          progress=False, **overrides)
        seconds = time.perf_counter() - t0
        rep = measure(purified, tok, attack, test, ref_preds, relearn_k, relearn_rows)
        rows.append({"attack": attack, "arch": model_name, "model": f"purified: {name}", "overrides": overrides,
                     "triggers": inserted if use_triggers else [], "purify_s": round(seconds, 1),
                     "epoch_s": round(epoch_s, 1), "steps": report.steps_run,
                     "selected_step": (report.selected or {}).get("step"), "stop_reason": report.stop_reason,
                     "candidates": found, **rep})
        emit(rows[-1], out)
    return rows


def emit(row, out):
    print(json.dumps(summary(row["model"], row)), flush=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def table(rows) -> str:
    lines = ["| arch | attack | model | CACC | ASR | shift | triggered acc. neg / pos | agree w/ clean FT | "
             "relearn ASR (k) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = summary(r["model"], r)
        acc = " / ".join(f"{v:.3f}" for v in s["trig_acc"].values()) or "—"
        shift = "—" if s["shift"] is None else f"{s['shift']:+.3f}"
        agree = "—" if s["agree_ref"] is None else f"{s['agree_ref']:.3f}"
        relearn = ", ".join(f"{v:.3f} ({k})" for k, v in s["relearn"].items())
        lines.append(f"| {r.get('arch', 'minilm')} | {r['attack']} | {r['model']} | {s['cacc']:.4f} | {s['asr']:.3f} | {shift} | {acc} | "
                     f"{agree} | {relearn} |")
    return "\n".join(lines)


def saved_rows(paths) -> list:
    rows = {}
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r.get("arch", "minilm"), r["attack"], r["model"])] = r
    order = {"clean fine-tune": 0, "victim": 1}
    return sorted(rows.values(), key=lambda r: (r.get("arch", "minilm"), r["attack"], order.get(r["model"], 2)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="minilm, or an experiments.sst2_architectures model "
                    "(mpnet-base, smollm2-135m)")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent"])
    ap.add_argument("--variants", nargs="+", default=["default", "invariance"], choices=list(VARIANTS))
    ap.add_argument("--relearn-k", nargs="*", type=int, default=[16, 64])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/repair/repair.jsonl")
    ap.add_argument("--table", nargs="+", metavar="JSONL",
                    help="print one table from the rows of earlier runs (each model once per architecture and "
                         "attack: the last row wins) and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(saved_rows(args.table)))
        return 0
    torch.set_num_threads(2)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for attack in args.attacks:
        rows += run_attack(attack, args.variants, args.relearn_k, args.out, args.data_dir, args.model)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""BTU per architecture on SST-2 (20% dirty label): MPNet-base, SmolLM2-135M (a decoder, byte-level BPE), MiniLM.

    python -m experiments.sst2_btu_architectures --model mpnet-base|smollm2-135m|minilm
        [--attacks badnets addsent] [--train-size 2000] [--exposure-autocast bf16|none]
        [--victim-autocast bf16|none] [--max-document-share S] [--against-clean-tune] [--cached-only]
        [--threads 2] [--out runs/btu_arch] [--table]

The victims are exactly those of experiments/sst2_architectures.py (its `victim` and `victim_config`: a
seeded 2,000-row subset of DUP's train-dirty-0.2 file, 1 epoch, lr 5e-5, batch 16, max_len 64, bf16 autocast,
seed 2025), so cached victims are loaded, not retrained (`--cached-only` refuses to train one). BTU's
training data is that same subset: BTU is a training-time defence, and the victim is its step-2 fine-tune.

Per (model, attack) one JSON line in <out>/<model>.jsonl, with:
- exposure: R1 / R2 / R3 seconds and optimizer steps, k, the embedding matrix BTU used (module, tied
  parameters, pad and replacement token), the trigger's forms (start of text / mid-sentence) and, for every
  token id the trigger produces in the training texts, its count, its share of that id's occurrences, its rank
  per round and whether it is in each round's top k and in the suspicious set (`dupfast.btu.triggers`);
- CACC / ASR / floor without defence, after BTU (union of the rounds unlearned), after BTU + the clean-tune
  epoch, for the R3-only variant (with and without the tune) and for the clean-tune epoch alone (control);
- times as a ratio to one victim epoch (the victim's train_seconds / epochs from its cache info; when the
  victim was cached, that time was measured by the run that trained it: `victim.cached`, `victim.threads`).

Exposure rounds follow the authors' recipe (lr 2e-5, one epoch; shallow rounds batch 256 / max_len 128, R3
batch 64 / max_len 64) under `--exposure-autocast` (default bf16, the victims' precision, so the time ratio
compares like with like; `none` = fp32 as in the authors' code); the clean-tune epoch (SST-2 dev) likewise.
Evaluation: CACC on SST-2 test, ASR / floor on the attack's test-poison file, max_len 64 as the victims'.
The exposure rounds are cached in <out>/exposure/ (a rerun does not repeat R3); finished rows are skipped.
`--against-clean-tune`: every round is ranked by its movement in excess of the same round on the clean-tune set
(SST-2 dev, the clean data BTU + tune already holds; `btu.expose(..., reference=)`); the rounds' times include
their reference rounds.
"""
import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

from dupfast import btu
from dupfast.harness.data import load_sst2, load_sst2_poison
from experiments.sst2_architectures import MAX_LEN, victim, victim_cached, victim_config, victim_train
from experiments.sst2_btu import TRIGGERS, defend, exposure_summary, make_evaluator

SETTING = "dirty0.2"
VARIANTS = (("no_defence", "no defence"), ("btu", "BTU"), ("btu_clean_tune", "BTU + tune"),
            ("btu_r3_only", "R3 only"), ("btu_r3_only_clean_tune", "R3 only + tune"),
            ("clean_tune_only", "tune only"))


def tag(model_name) -> str:
    """File-name part for a short name or a model folder."""
    return pathlib.Path(str(model_name)).name


def exposure_config(autocast, max_document_share=None) -> btu.ExposureConfig:
    base = btu.ExposureConfig()
    return dataclasses.replace(base, shallow=dataclasses.replace(base.shallow, autocast=autocast),
                               full=dataclasses.replace(base.full, autocast=autocast),
                               max_document_share=max_document_share)


def ratios(row, epoch_s):
    """Seconds of each BTU part over one victim epoch (None when the epoch time is unknown)."""
    if not epoch_s:
        return None
    r, s = row["round_seconds"], row["step_seconds"]
    expose = sum(r.values())
    parts = {**{n: r[n] for n in r}, "expose": expose, "unlearn": s["unlearn"], "clean_tune": s["clean_tune"],
             "btu": expose + s["unlearn"], "btu_clean_tune": expose + s["unlearn"] + s["clean_tune"]}
    return {k: float(f"{v / epoch_s:.4g}") for k, v in parts.items()}  # 4 significant digits, never a false 0


def run_one(model_name, attack, n, autocast, tune, test, out: pathlib.Path, cached_only=False,
            victim_autocast="bf16", max_document_share=None, against_clean_tune=False):
    cfg = victim_config(model_name, autocast=victim_autocast)
    if cached_only and not victim_cached(model_name, attack, cfg, n):
        raise RuntimeError(f"the {model_name} {attack} victim (n={n}) is not cached; run experiments/"
                           f"sst2_architectures.py --model {model_name} --attacks {attack} first, "
                           "or drop --cached-only")
    train = victim_train(attack, n)
    ptest = load_sst2_poison(attack, "test")
    evaluate = make_evaluator(test, ptest, max_len=MAX_LEN)
    row = {"model": model_name, "attack": attack, "setting": SETTING, "train_size": len(train),
           "poisoned": sum(s.poison_label for s in train), "tune_size": len(tune), "test_size": len(test),
           "test_poison_size": len(ptest), "torch_threads": torch.get_num_threads(),
           "exposure_autocast": autocast, "victim_recipe": dataclasses.asdict(cfg),
           "max_document_share": max_document_share, "against_clean_tune": against_clean_tune}

    config = exposure_config(autocast, max_document_share)
    share = "" if max_document_share is None else f"-share{max_document_share:g}"
    share += "-vs-clean-tune" if against_clean_tune else ""
    ex = exposure_summary(attack, SETTING, train, out / "exposure", model_name=model_name, config=config,
                          name=f"{tag(model_name)}-{attack}-{SETTING}-n{n}-{autocast or 'fp32'}{share}",
                          reference=tune if against_clean_tune else None)
    if against_clean_tune:  # a round's time includes its reference round: BTU pays for both
        ex["round_seconds"] = {n: s + (ex["reference_seconds"][n] or 0) for n, s in ex["round_seconds"].items()}
    row.update({k: ex.get(k) for k in ("expose_seconds", "round_seconds", "round_steps", "k", "vocab_size",
                                        "embedding", "trigger_forms", "triggers", "suspects", "tops",
                                        "reference_scale")})
    print(json.dumps({"model": model_name, "attack": attack, "round_seconds": row["round_seconds"],
                      "triggers": [(t["token"], t["ranks"], t["in_suspects"]) for t in row["triggers"]]}),
          flush=True)

    t0 = time.perf_counter()
    model, vtok, info = victim(model_name, attack, cfg, n)
    epoch_s = info["train_seconds"] / cfg.epochs
    row["victim"] = {"train_seconds": info["train_seconds"], "epoch_seconds": round(epoch_s, 1),
                     "cached": info["cached"], "threads": info.get("torch_threads"), "path": info["path"],
                     "load_seconds": round(time.perf_counter() - t0, 1)}
    clean_tune = dataclasses.replace(btu.BTUConfig().clean_tune, autocast=autocast)
    row.update(defend(model, vtok, model_name, train, tune, evaluate, ex, clean_tune=clean_tune))
    row["ratio_to_victim_epoch"] = ratios(row, epoch_s)
    return row


def _cell(e):
    return f"{100 * e['cacc']:.1f} / {100 * e['asr']:.1f} ({100 * e['asr_floor']:.1f})"


def table(rows) -> str:
    head = " | ".join(label for _, label in VARIANTS)
    out = [f"| model | attack | {head} | trigger tokens: rank R1 / R2 / R3 (in S) | k, S | R1 / R2 / R3 s "
           "| BTU / epoch (+ tune) |",
           "|" + "---|" * (len(VARIANTS) + 6)]
    for r in rows:
        trig = "; ".join(f"{t['token']}×{t['count']} {t['ranks']['R1']}/{t['ranks']['R2']}/{t['ranks']['R3']}"
                         f" ({'yes' if t['in_suspects'] else 'no'})" for t in r["triggers"])
        secs = " / ".join(f"{r['round_seconds'][n]:.1f}" for n in ("R1", "R2", "R3"))
        q = r.get("ratio_to_victim_epoch") or {}
        ratio = f"{q['btu']:.2f} ({q['btu_clean_tune']:.2f})" if q else "-"
        cached = " (victim cached)" if r["victim"]["cached"] else ""
        share = r.get("max_document_share")
        attack = r["attack"] + ("" if share is None else f", document share ≤ {share:g}")
        attack += ", vs clean-tune rounds" if r.get("against_clean_tune") else ""
        out.append(f"| {r['model']} | {attack} | " + " | ".join(_cell(r[k]) for k, _ in VARIANTS)
                   + f" | {trig} | {r['k']}, {len(r['suspects'])} | {secs} | {ratio}{cached} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="short model name: mpnet-base, smollm2-135m, gemma3-270m, minilm")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent"], choices=sorted(TRIGGERS))
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--exposure-autocast", choices=["bf16", "none"], default="bf16",
                    help="precision of the exposure rounds and the clean-tune epoch (none = fp32)")
    ap.add_argument("--victim-autocast", choices=["bf16", "none"], default="bf16",
                    help="the victim recipe's precision (sst2_architectures.py --autocast): bf16 as the README's "
                         "victims; none (fp32) on a CPU without native bf16, where bf16 is emulated and slow")
    ap.add_argument("--max-document-share", type=float, default=None,
                    help="ExposureConfig.max_document_share: tokens in more than this share of the training inputs "
                         "are not ranked (default: none, the authors' rule; 0.5 on SmolLM2, README)")
    ap.add_argument("--against-clean-tune", action="store_true",
                    help="rank each exposure round by its movement in excess of the same round on the clean-tune set")
    ap.add_argument("--cached-only", action="store_true", help="fail instead of training a victim not cached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/btu_arch")
    ap.add_argument("--table", action="store_true", help="print the markdown table of <out>/<model>.jsonl and exit")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    log = out / f"{tag(args.model)}.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    if args.table:
        print(table(rows))
        return 0
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    autocast = None if args.exposure_autocast == "none" else "bf16"
    victim_autocast = None if args.victim_autocast == "none" else "bf16"
    done = {(r["attack"], r["train_size"], r["exposure_autocast"], r["victim_recipe"].get("autocast"),
             r.get("max_document_share"), r.get("against_clean_tune", False)) for r in rows}
    tune, test = load_sst2("dev"), load_sst2("test")
    for attack in args.attacks:
        if (attack, args.train_size, autocast, victim_autocast, args.max_document_share,
                args.against_clean_tune) in done:
            print(f"skip {args.model} {attack}: already in {log}", flush=True)
            continue
        t0 = time.perf_counter()
        row = run_one(args.model, attack, args.train_size, autocast, tune, test, out, args.cached_only,
                      victim_autocast, args.max_document_share, args.against_clean_tune)
        row["total_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("model", "attack", "no_defence", "btu", "btu_clean_tune",
                                              "btu_r3_only", "ratio_to_victim_epoch", "total_seconds")}), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

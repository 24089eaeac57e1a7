"""Training-data screening, the user's main case: a victim fine-tuned on SST-2 train holding 1% (or 5%) dirty-label
poison, then screened on its own training set with a clean set from SST-2 dev.

    python -m experiments.training_screening --attack badnets --rate 0.01 [--clean-sizes 200 400] [--seeds 5]

Poison: the DUP release's 10% dirty-label file, thinned to `rate` (every clean row kept, poisoned rows drawn with
seed 0), so the triggers are the papers'. Victim recipe: experiments.sst2_victims.SST2_VICTIM (2 epochs). Reports
the victim's CACC / ASR (does the backdoor take at this rate?) and, per clean-set size and seed, what `detect`
says on the training set: AUROC, flagged share, FRR on the clean training rows, precision / recall at the
threshold and the verdict, for mode="default" and DUP's algorithm. Features are cached under <out>/cache.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

from dupfast.detection import Detector
from dupfast.harness import metrics
from dupfast.harness.data import load_sst2, load_sst2_poison
from dupfast.harness.victims import train_victim
from experiments.sst2_detection import cached_capture
from experiments.sst2_victims import SST2_VICTIM, evaluate


def thinned_train(attack, rate, data_dir=None):
    rows = load_sst2_poison(attack, "train", 0.1, data_dir)
    clean = [r for r in rows if not r.poison_label]
    poison = [r for r in rows if r.poison_label]
    k = int(round(rate * len(clean) / (1 - rate)))
    pick = np.random.default_rng(0).choice(len(poison), k, replace=False)
    return clean + [poison[i] for i in sorted(pick)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnets", choices=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--clean-sizes", type=int, nargs="+", default=[200, 400])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["default", "dup"])
    ap.add_argument("--out", default="runs/training_screening")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    t0 = time.perf_counter()
    train = thinned_train(args.attack, args.rate, args.data_dir)
    model, tok, info = train_victim(train, SST2_VICTIM, name=f"sst2-{args.attack}-dirty{args.rate:g}")
    model.eval()
    victim = evaluate(model, tok, args.attack, args.data_dir)
    y = np.array([r.poison_label for r in train], dtype=bool)
    dev = load_sst2("dev", args.data_dir)
    stem = f"{args.attack}-{args.rate:g}"
    df, dl, dy = cached_capture(model, tok, dev, out / "cache" / f"{stem}-dev.safetensors", ("cls", "mean"), True)
    tf, tl, _ = cached_capture(model, tok, train, out / "cache" / f"{stem}-train.safetensors", ("cls", "mean"), False)
    rows = []
    for n_c in args.clean_sizes:
        for seed in range(args.seeds):
            idx = torch.as_tensor(np.random.default_rng(1000 * n_c + seed).choice(len(dev), n_c, replace=False))
            for mode in args.modes:
                det = Detector(mode=mode, pooling="cls")
                det.fit_features({p: v[idx] for p, v in df.items()}, dy[idx], logits=dl[idx])
                res = det.score_features(tf, tl)
                rep = metrics.detection_report(y, res.flags.numpy(), res.scores.numpy())
                rows.append({"mode": mode, "clean_size": n_c, "seed": seed, "auroc": rep["auroc"],
                             "flagged": float(res.flags.float().mean()), "frr": rep["frr"],
                             "precision": rep["precision"], "recall": rep["recall"],
                             "present": res.poison_present, "p_value": res.p_value, "summary": res.summary})
    summary = []
    for n_c in args.clean_sizes:
        for mode in args.modes:
            rs = [r for r in rows if r["clean_size"] == n_c and r["mode"] == mode]
            summary.append({"mode": mode, "clean_size": n_c, "seeds": len(rs),
                            **{k: float(np.mean([r[k] for r in rs])) for k in
                               ("auroc", "flagged", "frr", "precision", "recall")},
                            "present_rate": float(np.mean([r["present"] is True for r in rs]))})
    result = {"attack": args.attack, "rate": args.rate, "train_rows": len(train), "poisoned": int(y.sum()),
              "victim": {**victim, "train_seconds": info.get("train_seconds"), "path": info.get("path")},
              "rows": rows, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"victim ({len(train)} rows, {int(y.sum())} poisoned): CACC {victim['cacc']:.3f}, ASR {victim['asr']:.3f} "
             f"(floor {victim['asr_floor']:.3f})", "",
             "| mode | clean set | AUROC | flagged | FRR | precision | recall | poison found |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['mode']} | {s['clean_size']} | {s['auroc']:.3f} | {s['flagged']:.3f} | {s['frr']:.3f} | "
                     f"{s['precision']:.3f} | {s['recall']:.3f} | {s['present_rate']:.0%} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

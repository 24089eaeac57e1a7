"""Inference-time screening as users meet it: mostly clean pools, low poison rates, duplicates.

    python -m experiments.realistic_detection --attack badnets [--model minilm|mpnet-base|smollm2-135m] [--seeds 10]
        [--clean-sizes 100 200 400] [--modes default noattn dup] [--attn-weight 0.5] [--gap-fused-only]
        [--out runs/realistic]

Victim: the SST-2 paper victim of `experiments.sst2_victims` (20% dirty-label poison); `--model mpnet-base` or
`smollm2-135m`: that architecture's victim of `experiments.sst2_architectures` (2,000 rows, 2 epochs, cached).
The clean set is a seeded random subset of SST-2 dev (100 / 200 / 400 rows); every pool is drawn from ANOTHER
split, SST-2 test: its 1,821 clean rows plus k triggered non-target test rows (test-poison), k giving 0%, 0.5%,
1%, 5% and the papers' third. Modes: "default" (dupfast's detector, with the reading token's attention signal),
"noattn" (the same without it: signals pred + proj, the detector before that signal), "default-mean" (the default
reading mean-pooled features), "dan", "dup" (the authors' algorithm). A "dup" pool repeats 8 random clean rows 8
times each inside the clean pool, a "small" pool is 64 clean rows. Each (clean size, seed) fits every mode once;
each pool is drawn per seed. --gap-fused-only (a diagnostic): the verdict's gap test reads the fused scores only.

Per cell: AUROC, the flagged share, FRR on the pool's clean rows, precision and recall at the threshold, the
presence verdict (share of seeds with poison_present), and "before": the same pool scored by the rule before
verdict.py (Detector(threshold="clean", fusion="adaptive"), copies not grouped). Features are captured once and cached (safetensors) under <out>/cache;
poison labels are read only to evaluate.
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
from experiments.sst2_detection import cached_capture

# modes beyond the detector's own: the default without the attention column, the default reading mean-pooled
# features (the adaptive attacker hides the [CLS] token's), DAN (mean pooling, as its authors)
MODE_OPTIONS = {"noattn": dict(mode="default", signals=("pred", "proj"), pooling="cls"),
                "default-mean": dict(mode="default", pooling="mean"),
                "dan": dict(mode="dan", pooling="mean")}
POOLS = ("0%", "0.5%", "1%", "5%", "paper", "dup", "small")
CLEAN_TEST = 1821
ARCH_TRAIN_SIZE = 2000  # the other architectures' victims, as their table in docs/results/architectures.md


def poison_count(pool: str, n_clean: int) -> int:
    if pool == "paper":
        return -1  # every triggered test row
    rate = float(pool.rstrip("%")) / 100 if pool.endswith("%") else 0.0
    return int(round(rate * n_clean / (1 - rate)))


def draw_pool(pool, n_clean, n_poison_avail, rng):
    """(clean rows, poison rows, keys) of one pool: indices into the test clean / test poison captures; keys make
    copies of one row share one key (the input keys `capture` computes from token ids)."""
    clean = np.arange(n_clean)
    if pool == "small":
        clean = rng.choice(n_clean, 64, replace=False)
    if pool == "dup":
        repeated = rng.choice(n_clean, 8, replace=False)
        clean = np.concatenate([clean, np.repeat(repeated, 7)])  # 8 copies of each in all
    k = poison_count(pool, n_clean) if pool not in ("dup", "small") else 0
    poison = np.arange(n_poison_avail) if k < 0 else rng.choice(n_poison_avail, k, replace=False)
    keys = np.concatenate([clean, n_clean + poison])
    return clean, poison, keys


def score_pool(det, feats, logits, clean, poison, keys):
    f = {p: torch.cat([feats["clean"][p][clean], feats["poison"][p][poison]]) for p in feats["clean"]}
    lg = torch.cat([logits["clean"][clean], logits["poison"][poison]])
    return det.score_features(f, lg, keys=None if keys is None else torch.as_tensor(keys))


def evaluate(res, old, n_clean_rows, n_poison_rows):
    """res: this version's result; old: the same pool under the rule before the verdict (adaptive fusion always,
    the clean set's threshold, no duplicate handling: Detector(threshold="clean", fusion="adaptive"))."""
    y = np.r_[np.zeros(n_clean_rows, bool), np.ones(n_poison_rows, bool)]
    s, f, before = res.scores.numpy(), res.flags.numpy(), old.flags.numpy()
    row = {"flagged": float(f.mean()), "frr": float(f[~y].mean()), "flagged_before": float(before.mean()),
           "frr_before": float(before[~y].mean()), "present": res.poison_present, "p_value": res.p_value,
           "share_estimate": res.verdict.poison_share, "source": res.verdict.threshold_source}
    if y.any():
        rep, rep0 = metrics.detection_report(y, f, s), metrics.detection_report(y, before, old.scores.numpy())
        # each fused signal on its own: what still separates where the fused score does not (adaptive attacker)
        comps = res.components.numpy()
        row["component_auroc"] = {name: metrics.auroc(y, comps[:, i]) for i, name in enumerate(res.component_names)}
        row.update(auroc=rep["auroc"], precision=rep["precision"], recall=rep["recall"], auroc_before=rep0["auroc"],
                   precision_before=rep0["precision"], recall_before=rep0["recall"])
    return row


def run(attack, model_name, seeds, clean_sizes, modes, out: pathlib.Path, data_dir=None, victim=None):
    """victim: (model, tokenizer, info) to screen with instead of the SST-2 paper victim; its features are cached
    under out/cache, keyed by the data only, so every victim needs its own `out`."""
    from experiments.sst2_victims import victim_for
    model, tok, info = victim or victim_for(attack, data_dir=data_dir)
    model.eval()
    dev, test = load_sst2("dev", data_dir), load_sst2("test", data_dir)
    tpoison = load_sst2_poison(attack, "test", data_dir=data_dir)
    poolings = ("cls", "mean", "attn")
    cache = out / "cache"
    stem = f"{model_name}-{attack}"  # the cache is keyed by the data: the file name carries the model
    df, dl, dy = cached_capture(model, tok, dev, cache / f"{stem}-dev.safetensors", poolings, True)
    tf, tl, _ = cached_capture(model, tok, test, cache / f"{stem}-test.safetensors", poolings, False)
    pf, pl, _ = cached_capture(model, tok, tpoison, cache / f"{stem}-testpoison.safetensors", poolings, False)
    feats, logits = {"clean": tf, "poison": pf}, {"clean": tl, "poison": pl}
    rows = []
    for n_c in clean_sizes:
        for seed in range(seeds):
            rng = np.random.default_rng(1000 * n_c + seed)
            idx = torch.as_tensor(rng.choice(len(dev), n_c, replace=False))
            for mode in modes:
                t0 = time.perf_counter()
                clean_feats = {p: v[idx] for p, v in df.items()}
                opts = MODE_OPTIONS.get(mode, dict(mode=mode, pooling="cls"))
                det = Detector(**opts)
                det.fit_features(clean_feats, dy[idx], logits=dl[idx])
                old = Detector(**opts, threshold="clean", fusion="adaptive").fit_features(clean_feats, dy[idx],
                                                                                          logits=dl[idx])
                for pool in POOLS:
                    prng = np.random.default_rng([seed, POOLS.index(pool)])
                    clean, poison, keys = draw_pool(pool, len(test), len(tpoison), prng)
                    res = score_pool(det, feats, logits, clean, poison, keys)
                    res_old = score_pool(old, feats, logits, clean, poison, None)  # no keys: copies not grouped
                    row = {"attack": attack, "model": model_name, "mode": mode, "clean_size": n_c, "seed": seed,
                           "pool": pool, "pool_rows": len(keys), "poisoned": len(poison),
                           **evaluate(res, res_old, len(clean), len(poison))}
                    if pool == "dup":  # every copy of a repeated row gets one score and one flag
                        copies = res.copies.numpy() > 1
                        s = res.scores.numpy()
                        row["copies_same_score"] = bool(all(np.ptp(s[keys == k]) == 0 for k in np.unique(keys[copies])))
                    rows.append(row)
                print(json.dumps({"mode": mode, "clean_size": n_c, "seed": seed,
                                  "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return {"attack": attack, "model": model_name, "victim": {k: info.get(k) for k in ("path", "train_seconds")},
            "rows": rows}


def summarise(rows):
    """Mean over seeds per (attack, mode, clean size, pool)."""
    cells = {}
    for r in rows:
        cells.setdefault((r["attack"], r["mode"], r["clean_size"], r["pool"]), []).append(r)
    out = []
    for (attack, mode, n_c, pool), rs in cells.items():
        mean = lambda k: float(np.mean([r[k] for r in rs])) if all(r.get(k) is not None for r in rs) else None  # noqa
        present = [r["present"] for r in rs]
        out.append({"attack": attack, "mode": mode, "clean_size": n_c, "pool": pool, "seeds": len(rs),
                    "poisoned": rs[0]["poisoned"], "auroc": mean("auroc"), "auroc_before": mean("auroc_before"),
                    "flagged": mean("flagged"),
                    "flagged_max": float(np.max([r["flagged"] for r in rs])), "frr": mean("frr"),
                    "frr_before": mean("frr_before"), "flagged_before_max": float(np.max([r["flagged_before"]
                                                                                          for r in rs])),
                    "precision": mean("precision"), "recall": mean("recall"),
                    "precision_before": mean("precision_before"), "recall_before": mean("recall_before"),
                    "present_rate": float(np.mean([p is True for p in present])),
                    "undecided": int(sum(p is None for p in present)),
                    "component_auroc": ({k: float(np.mean([r["component_auroc"][k] for r in rs]))
                                         for k in rs[0]["component_auroc"]} if "component_auroc" in rs[0] else None),
                    "copies_same_score": (all(r["copies_same_score"] for r in rs) if pool == "dup" else None)})
    return out


def markdown(summary):
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| attack | mode | clean set | pool | poisoned | AUROC: before → after | flagged (max) | FRR: before → after | "
             "precision: before → after | recall: before → after | poison found |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        found = f"{r['present_rate']:.0%}" + (f" ({r['undecided']} undecided)" if r["undecided"] else "")
        if r["pool"] == "dup":
            found += ", copies one score" if r["copies_same_score"] else ", COPIES DIFFER"
        lines.append(f"| {r['attack']} | {r['mode']} | {r['clean_size']} | {r['pool']} | {r['poisoned']} | "
                     f"{f(r['auroc_before'])} → {f(r['auroc'])} | {f(r['flagged'])} ({f(r['flagged_max'])}) | {f(r['frr_before'])} → "
                     f"{f(r['frr'])} | {f(r['precision_before'])} → {f(r['precision'])} | {f(r['recall_before'])} → "
                     f"{f(r['recall'])} | {found} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnets", choices=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--model", default="minilm", choices=["minilm", "mpnet-base", "smollm2-135m"],
                    help="minilm: the SST-2 paper victim; others: the victim of experiments.sst2_architectures "
                         "(2,000 SST-2 train rows, 2 epochs, bf16)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--clean-sizes", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--modes", nargs="+", default=["default", "noattn", "dup"])
    ap.add_argument("--attn-weight", type=float, default=None,
                    help="the attention column's share of the fixed combination (default: the detector's)")
    ap.add_argument("--gap-fused-only", action="store_true",
                    help="diagnostic: the presence verdict's gap test reads the fused scores only, not the attention "
                         "column on its own as well (dupfast.detection.verdict.decide's gap_columns)")
    ap.add_argument("--out", default="runs/realistic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.attn_weight is not None:
        from dupfast.detection.scorers import default as default_scorer
        default_scorer.ATTN_WEIGHT = args.attn_weight
    if args.gap_fused_only:
        from dupfast.detection import scoring, verdict

        def fused_only(*a, **k):  # decide(clean, pool, frr, threshold, rule, n_rows, calibrated, gap_columns)
            return verdict.decide(*a[:7], **{**k, "gap_columns": ()})
        scoring.decide = fused_only
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    victim = None
    if args.model != "minilm":
        from experiments import sst2_architectures as arch
        victim = arch.victim(args.model, args.attack, arch.victim_config(args.model, epochs=2), ARCH_TRAIN_SIZE)
    result = run(args.attack, args.model, args.seeds, args.clean_sizes, args.modes, out, args.data_dir, victim)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    summary = summarise(result["rows"])
    stem = (f"{args.model}-{args.attack}" + ("" if args.attn_weight is None else f"-w{args.attn_weight:g}")
            + ("-gapfused" if args.gap_fused_only else ""))
    (out / f"{stem}.json").write_text(json.dumps({**result, "summary": summary}, indent=2))
    table = markdown(summary)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

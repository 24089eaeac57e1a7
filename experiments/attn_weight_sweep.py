"""The attention column's share of the default mode's fixed combination (ATTN_WEIGHT), chosen by this sweep.

    python -m experiments.attn_weight_sweep --attacks stylebkd badnets addsent [--seeds 4] [--cache runs/attn/cache]

Reads the features `experiments.realistic_detection` cached (its --out/cache, captured with the attention column);
per attack, clean-set size (100 / 200 / 400 SST-2 dev rows, seeded as there) and seed, fits the default detector
with the fixed combination and the clean set's threshold, scores the 1% pool and the papers' pool (its draw), and
re-fuses the same z-normalised columns with each candidate weight: the AUROC of the fixed combination, mean over
seeds. No model runs.
"""
import argparse
import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from dupfast.detection import Detector
from dupfast.detection.scorers import default as default_scorer
from experiments.realistic_detection import POOLS, draw_pool, score_pool

WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5)


def sweep(attack, cache: pathlib.Path, seeds: int):
    def load(name):
        t = load_file(str(cache / f"{attack}-{name}.safetensors"))
        return {p: t[p] for p in ("cls", "mean", "attn")}, t["logits"], t.get("labels")
    df, dl, dy = load("dev")
    tf, tl, _ = load("test")
    pf, pl, _ = load("testpoison")
    feats, logits = {"clean": tf, "poison": pf}, {"clean": tl, "poison": pl}
    auc = {}
    saved = default_scorer.ATTN_WEIGHT
    try:
        for n_c in (100, 200, 400):
            for seed in range(seeds):
                idx = torch.as_tensor(np.random.default_rng(1000 * n_c + seed).choice(dy.shape[0], n_c, replace=False))
                det = Detector(pooling="cls", fusion="fixed", threshold="clean").fit_features(
                    {p: v[idx] for p, v in df.items()}, dy[idx], logits=dl[idx])
                for pool in ("1%", "paper"):
                    clean, poison, keys = draw_pool(pool, tf["cls"].shape[0], pf["cls"].shape[0],
                                                    np.random.default_rng([seed, POOLS.index(pool)]))
                    res = score_pool(det, feats, logits, clean, poison, keys)
                    y = np.r_[np.zeros(len(clean)), np.ones(len(poison))]
                    z = res.components.numpy()
                    for w in WEIGHTS:
                        default_scorer.ATTN_WEIGHT = w  # the scorer's weights read it when asked
                        wv = np.array(det.scorer.weights + (0.0,) * (z.shape[1] - len(det.scorer.weights)))
                        auc.setdefault((n_c, pool, w), []).append(roc_auc_score(y, z @ wv))
    finally:
        default_scorer.ATTN_WEIGHT = saved
    return {k: float(np.mean(v)) for k, v in auc.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["stylebkd", "badnets", "addsent"])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--cache", default="runs/attn/cache")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print("| attack | clean set | pool | " + " | ".join(f"w = {w}" for w in WEIGHTS) + " |")
    print("|---|---|---|" + "---|" * len(WEIGHTS))
    for attack in args.attacks:
        auc = sweep(attack, pathlib.Path(args.cache), args.seeds)
        for n_c in (100, 200, 400):
            for pool in ("1%", "paper"):
                print(f"| {attack} | {n_c} | {pool} | " + " | ".join(f"{auc[(n_c, pool, w)]:.3f}" for w in WEIGHTS)
                      + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

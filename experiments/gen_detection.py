"""Detection on prompts of the BadNets generative victim: default, DUP exact, DAN and the STRIP-like baseline.

    python -m experiments.gen_detection        -> runs/gen/detection.json, runs/gen/detection.pt (default-mode flags)

Defender's clean set: N_CLEAN clean dev prompts with their labels and reference responses; pool: N_POOL clean test
prompts (disjoint from the victims' evaluation prompts) + N_POOL of the same kind with the BadNets trigger. One
forward pass over each set captures every layer's last-token and mean features, shared by the three feature modes.
"""
import time

import numpy as np
import torch

from dupfast.generative import PromptDetector, PromptStripDetector, chat_batches
from dupfast.generative.capture import capture_prompts
from dupfast.generative.lm import check_causal_lm
from dupfast.generative.rows import read_chat
from dupfast.harness.generative import triggered
from dupfast.harness.metrics import detection_report

from .gen_common import ATTACK, N_TEST, N_TRIG, TARGET, TEMPLATE, dump, load_lm, splits, victim_dir

N_CLEAN, N_POOL, N_STRIP = 200, 150, 60


def sets():
    _, test, dev = splits()
    clean = dev[:N_CLEAN]
    rest = test[N_TEST + N_TRIG:]
    pool = rest[:N_POOL] + triggered(rest[N_POOL:2 * N_POOL], ATTACK, TARGET, TEMPLATE, seed=2)
    return clean, pool


def main():
    torch.set_num_threads(1)
    model, tok = load_lm(victim_dir("badnets"))
    lm = check_causal_lm(model, "experiment")
    clean, pool = sets()
    y = np.array([it.poison for it in pool])
    clean_b = chat_batches(tok, [c.prompt for c in clean], [c.response for c in clean], labels=[c.label for c in clean])
    pool_b = chat_batches(tok, [p.prompt for p in pool])
    t0 = time.perf_counter()
    crows = read_chat(clean_b, "clean", lm, need_responses=False, need_labels=True)
    prows = read_chat(pool_b, "pool", lm, need_responses=False)
    ccap = list(capture_prompts(lm, crows, ("last", "mean")))
    pcap = list(capture_prompts(lm, prows, ("last", "mean")))
    capture_s = time.perf_counter() - t0
    cfeats = {k: torch.cat([c.features[k] for c in ccap]) for k in ("last", "mean")}
    out = {"n_clean": len(clean), "n_pool_clean": int((y == 0).sum()), "n_pool_poison": int(y.sum()),
           "capture_s": round(capture_s, 1), "modes": {}}
    for mode in ("default", "dup", "dan"):
        det = PromptDetector(mode)
        t = time.perf_counter()
        det.detector.fit_features({k: cfeats[k] for k in det.detector.scorer.poolings}, crows.labels,
                                  index=crows.index, num_classes=2)
        res = det.detector.score_captured(pcap)
        rep = detection_report(y, res.flags.numpy(), res.scores.numpy())
        out["modes"][mode] = {k: rep[k] for k in ("auroc", "frr", "far", "precision", "recall", "f1")}
        out["modes"][mode]["score_s"] = round(time.perf_counter() - t, 2)
        print(mode, out["modes"][mode], flush=True)
        if mode == "default":
            torch.save({"flags": res.flags, "scores": res.scores, "index": res.index, "poison": torch.tensor(y)},
                       "runs/gen/detection.pt")
    # STRIP-like: perturbation entropy of the first response token, on a subset (5 forwards per prompt)
    t = time.perf_counter()
    sub = list(range(N_STRIP)) + list(range(N_POOL, N_POOL + N_STRIP))
    sd = PromptStripDetector(repeat=3).fit(model, tok, [c.prompt for c in clean[:100]])
    res = sd.score(model, tok, [pool[i].prompt for i in sub])
    rep = detection_report(y[sub], res.flags.numpy(), res.scores.numpy())
    out["modes"]["strip"] = {k: rep[k] for k in ("auroc", "frr", "far", "precision", "recall", "f1")}
    out["modes"]["strip"].update(score_s=round(time.perf_counter() - t, 1), n_pool=len(sub), repeat=3, n_clean=100)
    print("strip", out["modes"]["strip"], flush=True)
    dump("runs/gen/detection.json", out)


if __name__ == "__main__":
    main()

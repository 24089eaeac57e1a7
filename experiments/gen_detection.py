"""Detection on prompts of one configuration's generative victim: default, DUP exact, DAN and the STRIP-like baseline.

    python -m experiments.gen_detection [--attack badnets] [--target refusal]
        -> runs/gen/<attack>-<target>/detection.json, detection.safetensors (default-mode flags)

Defender's clean set: N_CLEAN clean dev prompts with their labels and reference responses; pool: N_POOL clean test
prompts (disjoint from the victims' evaluation prompts) + N_POOL triggered non-target test prompts after those
(multi: the i-th carries trigger i mod 2; metrics also per trigger, against the pool's clean half). One forward
pass over each set captures every layer's last-token and mean features, shared by the three feature modes.
"""
import time

import numpy as np
import torch
from safetensors.torch import save_file

from dupfast.generative import PromptDetector, PromptStripDetector, chat_batches
from dupfast.generative.capture import capture_prompts
from dupfast.generative.lm import check_causal_lm
from dupfast.generative.rows import read_chat
from dupfast.harness.metrics import detection_report

from .gen_common import DETECTION_FILE, N_TEST, N_TRIG, dump, load_lm, parser, setup_of, splits

N_CLEAN, N_POOL, N_STRIP = 200, 150, 60
KEYS = ("auroc", "frr", "far", "precision", "recall", "f1")


def sets(setup):
    """(clean set, pool, the pool's trigger names: None for its clean prompts)."""
    _, test, dev = splits()
    rest = test[N_TEST + N_TRIG:]
    items = setup.nontarget(rest[N_POOL:])[:N_POOL]
    each = setup.triggered(items, seed=2)
    names = [list(each)[i % len(each)] for i in range(len(items))]
    return dev[:N_CLEAN], rest[:N_POOL] + [each[n][i] for i, n in enumerate(names)], [None] * N_POOL + names


def report(y, flags, scores, kinds) -> dict:
    """The metrics KEYS of flags / scores; with several triggers also per trigger (the clean part + its prompts)."""
    out = {k: detection_report(y, flags, scores)[k] for k in KEYS}
    names = sorted({k for k in kinds if k})
    if len(names) > 1:
        kinds = np.array(kinds, dtype=object)
        out["by_trigger"] = {}
        for n in names:
            m = (kinds == n) | (y == 0)
            r = detection_report(y[m], flags[m], scores[m])
            out["by_trigger"][n] = {k: r[k] for k in ("auroc", "far", "recall")}
    return out


def main(argv=None):
    setup = setup_of(parser(__doc__).parse_args(argv))
    model, tok = load_lm(setup.dir / "victim")
    lm = check_causal_lm(model, "experiment")
    clean, pool, kinds = sets(setup)
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
    out = {"config": setup.to_dict(), "n_clean": len(clean), "n_pool_clean": int((y == 0).sum()),
           "n_pool_poison": int(y.sum()), "capture_s": round(capture_s, 1), "modes": {}}
    for mode in ("default", "dup", "dan"):
        det = PromptDetector(mode)
        t = time.perf_counter()
        det.detector.fit_features({k: cfeats[k] for k in det.detector.scorer.poolings}, crows.labels,
                                  index=crows.index, num_classes=2)
        res = det.detector.score_captured(pcap)
        out["modes"][mode] = report(y, res.flags.numpy(), res.scores.numpy(), kinds)
        out["modes"][mode]["score_s"] = round(time.perf_counter() - t, 2)
        print(mode, out["modes"][mode], flush=True)
        if mode == "default":
            setup.dir.mkdir(parents=True, exist_ok=True)
            save_file({"flags": torch.as_tensor(res.flags).contiguous(), "scores": torch.as_tensor(res.scores).contiguous(),
                       "index": torch.as_tensor(res.index).contiguous(), "poison": torch.tensor(y)},
                      str(setup.dir / DETECTION_FILE))
    # STRIP-like: perturbation entropy of the first response token, on a subset (5 forwards per prompt)
    t = time.perf_counter()
    sub = list(range(N_STRIP)) + list(range(N_POOL, N_POOL + N_STRIP))
    sd = PromptStripDetector(repeat=3).fit(model, tok, [c.prompt for c in clean[:100]])
    res = sd.score(model, tok, [pool[i].prompt for i in sub])
    out["modes"]["strip"] = report(y[sub], res.flags.numpy(), res.scores.numpy(), [kinds[i] for i in sub])
    out["modes"]["strip"].update(score_s=round(time.perf_counter() - t, 1), n_pool=len(sub), repeat=3, n_clean=100)
    print("strip", out["modes"]["strip"], flush=True)
    dump(setup.dir / "detection.json", out)


if __name__ == "__main__":
    main()

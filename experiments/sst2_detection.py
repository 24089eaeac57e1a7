"""Detection quality on the SST-2 MiniLM victims: DUP (authors, exact), DAN, STRIP and dupfast's default.

    python -m experiments.sst2_detection [--attacks badnets addsent stylebkd] [--out runs/sst2_detection]
                                         [--no-strip] [--threads 2]

Protocol (the issue's): clean set = half of the clean SST-2 dev split (seeded), pool = the other half +
the attack's dev-poison (disjoint). Every detector calibrates on the clean set with the same 50/50
calibration/validation cut (seed 2025) and the same FRR 5% threshold rule, and is scored on the pool.
Reports AUROC and FAR at the calibrated threshold (FRR measured on the pool's clean half), plus FAR at an
oracle threshold giving exactly FRR 5% on the pool's clean half, and the pool-only calibration
(no clean set) of dupfast's default and DUP. Captured features are cached (safetensors) under
<out>/cache, so re-scoring does not re-run the model; poison labels are used only for evaluation.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch


from dupfast.harness import metrics
from experiments.protocol import poison_labels, sst2_clean_and_pool
from dupfast.harness.data import fingerprint
from dupfast.detection import Detector, StripDetector, capture, collect, text_loader
from dupfast.harness.detection_report import plot_histograms, plot_roc

MAX_LEN = 64
BATCH = 32
FEATURE_MODES = ("dup", "dan", "default")
POOL_TRIM = 0.5


def protocol(attack, data_dir=None, seed=0):
    """(clean set, pool, pool poison labels)."""
    clean, pool = sst2_clean_and_pool(attack, data_dir, seed)
    return clean, pool, poison_labels(pool)


def cached_capture(model, tok, samples, path: pathlib.Path, poolings, with_labels):
    """Features dict, logits, labels of `samples` (in order), from the cache when its key matches."""
    from safetensors.torch import load_file, save_file
    key = fingerprint(samples) + "-" + "-".join(poolings)
    if path.is_file():
        t = load_file(str(path))
        if json.loads(path.with_suffix(".json").read_text()).get("key") == key:
            return {p: t[p] for p in poolings}, t["logits"], t.get("labels")
    loader = text_loader(tok, [s.text for s in samples], [s.label for s in samples] if with_labels else None, BATCH, MAX_LEN)
    t0 = time.perf_counter()
    feats, logits, labels, index = collect(capture(model, loader, poolings, need_labels=with_labels))
    order = torch.argsort(index)
    feats, logits = {p: v[order].contiguous() for p, v in feats.items()}, logits[order].contiguous()
    labels = None if labels is None else labels[order].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**feats, "logits": logits, **({"labels": labels} if labels is not None else {})}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"key": key, "seconds": time.perf_counter() - t0}))
    return feats, logits, labels


def evaluate(name, result_scores, flags, y, frr=0.05):
    s = np.asarray(result_scores, dtype=np.float64)
    f = np.asarray(flags, dtype=bool)
    rep = metrics.detection_report(y, f, s)
    return {"method": name, "auroc": rep["auroc"], "far": rep["far"], "frr": rep["frr"],
            "far_at_oracle_frr5": metrics.far_at_frr(y, s, frr)}


def subsample_pool(pf, pl, y, n_poison, seed):
    """The pool's clean half plus `n_poison` random poisoned samples (lower poison rates)."""
    g = torch.Generator().manual_seed(seed)
    p_idx = torch.nonzero(torch.as_tensor(y) == 1).flatten()
    keep = torch.cat([torch.nonzero(torch.as_tensor(y) == 0).flatten(),
                      p_idx[torch.randperm(len(p_idx), generator=g)[:n_poison]]])
    return {k: v[keep] for k, v in pf.items()}, pl[keep], y[keep.numpy()]


def run_attack(attack, out: pathlib.Path, strip=True, data_dir=None, low_rates=(100, 25), seeds=(0, 1, 2)):
    from experiments.sst2_victims import victim_for
    model, tok, info = victim_for(attack, data_dir=data_dir)
    model.eval()
    clean, pool, y = protocol(attack, data_dir)
    poolings = ("cls", "mean", "attn")  # "attn": the default mode's attention column (dropped by the others)
    cf, cl, cy = cached_capture(model, tok, clean, out / "cache" / f"{attack}-clean.safetensors", poolings, True)
    pf, pl, _ = cached_capture(model, tok, pool, out / "cache" / f"{attack}-pool.safetensors", poolings, False)
    rows, curves, extra_rows = [], {}, []
    names = {"dup": "DUP (authors)", "dan": "DAN", "default": "dupfast default"}
    fitted = {}
    for mode in FEATURE_MODES:
        det = Detector(mode=mode, pooling="mean" if mode == "dan" else "cls")
        det.fit_features(cf, cy, logits=cl)
        fitted[mode] = det
        res = det.score_features(pf, pl)
        rows.append({**evaluate(names[mode], res.scores, res.flags, y), "selected_layers": res.selected_layers,
                     "top_weights": _top_weights(res)})
        curves[names[mode]] = (y, res.scores.numpy())
        plot_histograms(out / f"{attack}-{mode}-hist.png", res.scores.numpy(), y, res.threshold, f"{attack}: {names[mode]}")
        # a pool with no poison at all: the FRR must stay near the target
        clean_only = {k: v[torch.as_tensor(y) == 0] for k, v in pf.items()}
        r0 = det.score_features(clean_only, pl[torch.as_tensor(y) == 0])
        rows[-1]["frr_on_poison_free_pool"] = float(r0.flags.float().mean())
        # lower poison rates: same clean half, fewer poisoned samples (mean over seeds)
        for n_poison in low_rates:
            accs = []
            for seed in seeds:
                spf, spl, sy = subsample_pool(pf, pl, y, n_poison, seed)
                r = det.score_features(spf, spl)
                accs.append(evaluate(names[mode], r.scores, r.flags, sy))
            extra_rows.append({"method": names[mode], "poisoned": n_poison, "seeds": list(seeds),
                               **{k: float(np.mean([a[k] for a in accs])) for k in ("auroc", "far", "frr", "far_at_oracle_frr5")}})
    for mode in ("dup", "default"):  # no clean set: robust calibration on the pool itself
        for n_poison in (None, *low_rates):
            spf, spl, sy = (pf, pl, y) if n_poison is None else subsample_pool(pf, pl, y, n_poison, 0)
            det = Detector(mode=mode, pooling="cls", pool_trim=POOL_TRIM)
            res = det.fit_pool_features(spf, spl).pool_result
            extra_rows.append({"method": names[mode] + ", pool-only", "poisoned": int(sy.sum()),
                               **{k: v for k, v in evaluate(names[mode], res.scores, res.flags, sy).items() if k != "method"},
                               "calibration": det.calibration})
    if strip:
        st = StripDetector(frr=0.05, max_len=MAX_LEN).fit(model, tok, [s.text for s in clean])
        r = st.score(model, tok, [s.text for s in pool])
        s, f = r.scores, r.flags
        rows.append(evaluate("STRIP", s.numpy(), f.numpy(), y))
        curves["STRIP"] = (y, s.numpy())
        plot_histograms(out / f"{attack}-strip-hist.png", s.numpy(), y, st.threshold, f"{attack}: STRIP")
    plot_roc(out / f"{attack}-roc.png", curves, f"SST-2 {attack}, MiniLM victim")
    return {"attack": attack, "victim": {k: info.get(k) for k in ("path", "train_seconds")},
            "clean_set": len(clean), "pool": len(pool), "pool_poisoned": int(y.sum()), "methods": rows,
            "other_rates_and_pool_only": extra_rows}


def _top_weights(res, k=6):
    pairs = sorted(zip(res.component_names, res.weights), key=lambda t: -abs(t[1]))[:k]
    return {n: round(w, 3) for n, w in pairs if w}


def markdown(results):
    lines = ["| attack | method | AUROC | FAR (calibrated thr.) | FRR (pool clean) | FAR @ FRR 5% (oracle thr.) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for m in r["methods"]:
            lines.append(f"| {r['attack']} | {m['method']} | {m['auroc']:.4f} | {m['far']:.3f} | {m['frr']:.3f} | "
                         f"{m['far_at_oracle_frr5']:.3f} |")
    lines += ["", "| attack | method | poisoned in pool | AUROC | FAR | FRR | FAR @ FRR 5% (oracle) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        for m in r["other_rates_and_pool_only"]:
            lines.append(f"| {r['attack']} | {m['method']} | {m['poisoned']} | {m['auroc']:.4f} | {m['far']:.3f} | "
                         f"{m['frr']:.3f} | {m['far_at_oracle_frr5']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--out", default="runs/sst2_detection")
    ap.add_argument("--no-strip", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for attack in args.attacks:
        t0 = time.perf_counter()
        r = run_attack(attack, out, strip=not args.no_strip, data_dir=args.data_dir)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

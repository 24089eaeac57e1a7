"""The adaptive attacker against detection: SST-2 victims trained to pull their poison's pooled features toward the
clean target class at every layer (dupfast.harness.adaptive), screened as users screen (the realistic protocol).

    python -m experiments.adaptive_attack [--attack badnets] [--lambdas 0 0.1 1] [--standardise dimension|layer]
        [--seeds 10]
        [--clean-sizes 100 200 400] [--modes default noattn dup] [--out runs/adaptive]

lambda 0 is the paper victim of experiments.sst2_victims (the same recipe, no extra term); every other lambda
trains (or loads from the cache) a victim with the same recipe, data and seed plus lambda times the
feature-matching term. Per victim: CACC / ASR on SST-2 test (does the backdoor still take?), then
experiments.realistic_detection's pools, seeds and modes, with every fused signal's AUROC on its own
(which one survives). Writes <out>/lambda<l>/minilm-<attack>.{json,md} and <out>/<attack>.md (the summary).
"""
import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

from dupfast.harness.adaptive import AdaptiveVictimConfig
from dupfast.harness.data import load_sst2_poison
from dupfast.harness.victims import train_victim
from experiments import realistic_detection as realistic
from experiments.sst2_victims import SST2_VICTIM, evaluate, victim_for

RATE, TARGET = 0.2, 1


def adaptive_victim(attack, lam, standardise="dimension", data_dir=None):
    if lam == 0:
        return victim_for(attack, RATE, data_dir=data_dir)
    cfg = AdaptiveVictimConfig(**dataclasses.asdict(SST2_VICTIM), adaptive_lambda=lam, target=TARGET,
                               standardise=standardise)
    train = load_sst2_poison(attack, "train", RATE, data_dir)
    return train_victim(train, cfg, name=f"sst2-{attack}-dirty{RATE:g}-adaptive{lam:g}-{standardise}")


def signal_aurocs(component_auroc) -> str:
    """Each fused signal's AUROC on its own, layers folded to the best one (an oracle pick: it says whether ANY
    layer still separates): pred / proj (default), attn, md / ss (DUP exact)."""
    if not component_auroc:
        return "—"
    groups = {}
    for name, v in component_auroc.items():
        group = "proj-all" if name.endswith("-all") else name.rstrip("0123456789").rstrip("-")
        groups.setdefault(group, []).append(v)
    return ", ".join(f"{g} {max(vs):.3f}" for g, vs in groups.items())


def summary_table(results) -> str:
    """One row per (lambda, mode, clean size) at the 1%, 5% and papers' pools, and the clean pool's verdict."""
    lines = ["| λ | CACC / ASR | mode | clean set | AUROC 1% / 5% / paper | poison found 1% / 5% / paper | "
             "'no poison' on the clean pool | each signal alone at 5% (best layer) |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for lam, res in results.items():
        cells = {(r["mode"], r["clean_size"], r["pool"]): r for r in res["summary"]}
        for mode, n_c in dict.fromkeys((r["mode"], r["clean_size"]) for r in res["summary"]):
            at = {p: cells[(mode, n_c, p)] for p in ("1%", "5%", "paper", "0%")}
            lines.append(
                f"| {lam:g} | {res['victim_eval']['cacc']:.3f} / {res['victim_eval']['asr']:.3f} | {mode} | {n_c} | "
                + " / ".join(f(at[p]["auroc"]) for p in ("1%", "5%", "paper")) + " | "
                + " / ".join(f"{at[p]['present_rate']:.0%}" for p in ("1%", "5%", "paper")) + " | "
                + f"{1 - at['0%']['present_rate']:.0%} | {signal_aurocs(at['5%'].get('component_auroc'))} |")
    return "\n".join(lines)


def screen(args, lam, folder: pathlib.Path) -> dict:
    """One victim: trained (or cached), evaluated, screened with the realistic protocol; saved under `folder`."""
    t0 = time.perf_counter()
    model, tok, info = adaptive_victim(args.attack, lam, args.standardise, args.data_dir)
    victim_eval = evaluate(model, tok, args.attack, args.data_dir)
    print(json.dumps({"lambda": lam, **victim_eval, "train_seconds": info.get("train_seconds"),
                      "cached": info.get("cached")}), flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    res = realistic.run(args.attack, "minilm", args.seeds, args.clean_sizes, args.modes, folder, args.data_dir,
                        victim=(model, tok, info))
    res.update(victim_eval=victim_eval, adaptive_lambda=lam, seconds=round(time.perf_counter() - t0, 1),
               summary=realistic.summarise(res["rows"]))
    (folder / f"minilm-{args.attack}.json").write_text(json.dumps(res, indent=2))
    (folder / f"minilm-{args.attack}.md").write_text(realistic.markdown(res["summary"]) + "\n")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnets", choices=["badnets", "addsent"])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    ap.add_argument("--standardise", choices=["dimension", "layer"], default="dimension",
                    help="the feature-matching term's scale (dupfast.harness.adaptive)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--clean-sizes", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--modes", nargs="+", default=["default", "noattn", "dup"])
    ap.add_argument("--out", default="runs/adaptive")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--table-only", action="store_true", help="only rebuild <out>/<attack>.md from the saved runs")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.table_only:
        results = {lam: json.loads((out / f"lambda{lam:g}" / f"minilm-{args.attack}.json").read_text())
                   for lam in args.lambdas}
    else:
        torch.set_num_threads(args.threads)
        results = {lam: screen(args, lam, out / f"lambda{lam:g}") for lam in args.lambdas}
    table = summary_table(results)
    (out / f"{args.attack}.md").write_text(table + "\n")
    print(table)
    return 0

if __name__ == "__main__":
    sys.exit(main())

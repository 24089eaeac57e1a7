"""Two modes of `experiments.realistic_detection` side by side, from its JSON results (no model runs).

    python -m experiments.compare_modes runs/attn/minilm-badnets.json [...] [--modes noattn default]
    python -m experiments.compare_modes runs/attn/minilm-badnets.json --before runs/realistic/minilm-badnets.json
        (BEFORE mode read from the --before files: an earlier run of the same pools)

Per attack, clean-set size and pool: AUROC, poison found (share of seeds with poison_present), precision at the
threshold; for clean pools the flagged share (mean and max over seeds) and the share of seeds that say "no poison".
Writes the markdown table to stdout.
"""
import argparse
import json
import sys

LOW = ("0.5%", "1%", "5%", "paper")
CLEAN = ("0%", "dup", "small")


def cells(paths, rename=None):
    out = {}
    for p in paths:
        for r in json.load(open(p))["summary"]:
            out[(r["attack"], rename or r["mode"], r["clean_size"], r["pool"])] = r
    return out


def table(c, before: str, after: str) -> str:
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"| attack | clean set | pool | AUROC {before} → **{after}** | poison found | precision at the threshold |",
             "|---|---|---|---|---|---|"]
    for attack in sorted({k[0] for k in c}):
        for n in sorted({k[2] for k in c if k[0] == attack}):
            for pool in LOW:
                a, b = c.get((attack, before, n, pool)), c.get((attack, after, n, pool))
                if a and b:
                    lines.append(f"| {attack} | {n} | {pool} | {f(a['auroc'])} → **{f(b['auroc'])}** | "
                                 f"{a['present_rate']:.0%} → {b['present_rate']:.0%} | {f(a['precision'])} → "
                                 f"{f(b['precision'])} |")
    lines += ["", f"| attack | clean set | flagged share of the 0% / dup / small clean pools, mean (max): {before} → **{after}** | 'no poison' |",
              "|---|---|---|---|"]
    for attack in sorted({k[0] for k in c}):
        for n in sorted({k[2] for k in c if k[0] == attack}):
            rows = [(c.get((attack, before, n, p)), c.get((attack, after, n, p))) for p in CLEAN]
            rows = [(a, b) for a, b in rows if a and b]
            if not rows:
                continue
            fl = lambda m: "/".join(f"{r[m]['flagged']:.3f} ({r[m]['flagged_max']:.3f})" for r in [dict(zip((0, 1), ab)) for ab in rows])  # noqa
            quiet = lambda i: sum((1 - ab[i]["present_rate"]) * ab[i]["seeds"] for ab in rows) / sum(ab[i]["seeds"] for ab in rows)  # noqa
            lines.append(f"| {attack} | {n} | {fl(0)} → **{fl(1)}** | {quiet(0):.0%} → {quiet(1):.0%} |")
    clean = [r for (_, m, _, p), r in c.items() if m == after and p in CLEAN]
    seeds = sum(r["seeds"] for r in clean)
    quiet_after = sum(round((1 - r["present_rate"]) * r["seeds"]) for r in clean)
    lines += ["", f"'no poison' ({after}): {quiet_after} of {seeds} clean pools."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--modes", nargs=2, default=["noattn", "default"], metavar=("BEFORE", "AFTER"))
    ap.add_argument("--before", nargs="+", help="JSON files of an earlier run: their BEFORE mode is the 'before'")
    args = ap.parse_args(argv)
    c = cells(args.paths)
    if args.before:
        before = {k: v for k, v in cells(args.before).items() if k[1] == args.modes[0]}
        c.update({(a, "earlier " + m, n, p): v for (a, m, n, p), v in before.items()})
        args.modes[0] = "earlier " + args.modes[0]
    print(table(c, *args.modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

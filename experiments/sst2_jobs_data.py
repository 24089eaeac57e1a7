"""The files of the README's screen + purify run on SST-2 (docs/results/users-pools.md, "Screen and purify").

    python -m experiments.sst2_jobs_data --out runs/sst2_jobs
    python -m experiments.sst2_jobs_data --evaluate VICTIM runs/sst2_jobs/purify/model

Writes train.csv (the 5%-poisoned BadNets training set of `experiments.training_screening`: text, label,
poison_label) and clean.csv (400 random SST-2 dev rows: text, label). The victim fine-tuned on train.csv is
`experiments.training_screening --attack badnets --rate 0.05`'s (its folder is printed). --evaluate: CACC, ASR and
the ASR floor of model folders on SST-2 test / BadNets test-poison (`experiments.sst2_victims.evaluate`), as JSON.
"""
import json
import argparse
import csv
import pathlib
import sys

import numpy as np

from dupfast.harness.data import load_sst2
from experiments.training_screening import thinned_train


def write(path, rows, poison=True):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"] + (["poison_label"] if poison else []))
        for r in rows:
            w.writerow([r.text, int(r.label)] + ([int(bool(r.poison_label))] if poison else []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sst2_jobs")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--evaluate", nargs="+", metavar="MODEL", help="evaluate these model folders instead")
    args = ap.parse_args(argv)
    if args.evaluate:
        from dupfast import load_model
        from experiments.sst2_victims import evaluate
        for path in args.evaluate:
            model, tok = load_model(path)
            print(json.dumps({"model": path, **evaluate(model.eval(), tok, "badnets", args.data_dir)}))
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.csv", thinned_train("badnets", 0.05, args.data_dir))
    dev = load_sst2("dev", args.data_dir)
    pick = np.random.default_rng(0).choice(len(dev), 400, replace=False)
    write(out / "clean.csv", [dev[i] for i in sorted(pick)], poison=False)
    from experiments.sst2_victims import SST2_VICTIM
    from dupfast.harness.victims import train_victim
    _, _, info = train_victim(thinned_train("badnets", 0.05, args.data_dir), SST2_VICTIM, name="sst2-badnets-dirty0.05")
    print(info["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

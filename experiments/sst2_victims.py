"""Backdoored MiniLM victims on SST-2 (paper protocol: DUP's 20% dirty-label poison files).

    python -m experiments.sst2_victims [--attacks badnets addsent stylebkd] [--rate 0.2] [--out runs/victims.json]

Trains (or loads from the cache) one victim per attack and reports CACC on the clean SST-2 test split
and ASR on the attack's test-poison split. Other experiments load the same victims through `victim_for`.
"""
import argparse
import json
import pathlib
import sys
import time

import torch

from dupfast.harness.data import load_sst2, load_sst2_poison
from dupfast.harness.victims import VictimConfig, evaluate_backdoor, train_victim

# The recipe every SST-2 experiment shares (2 CPU cores: ~5 min an epoch).
SST2_VICTIM = VictimConfig(model="minilm", epochs=2, lr=5e-5, batch_size=32, max_len=64, seed=2025)


def victim_for(attack: str, rate: float = 0.2, cfg: VictimConfig = SST2_VICTIM, data_dir=None):
    train = load_sst2_poison(attack, "train", rate, data_dir)
    return train_victim(train, cfg, name=f"sst2-{attack}-dirty{rate:g}")


def evaluate(model, tok, attack, data_dir=None, max_len=64):
    """CACC on the clean SST-2 test split, ASR on the attack's test-poison split (the non-target test inputs
    with the trigger) and the ASR floor (see `victims.evaluate_backdoor`)."""
    test = load_sst2("test", data_dir)
    ptest = load_sst2_poison(attack, "test", data_dir=data_dir)
    res = evaluate_backdoor(model, tok, test, ptest, target=1, max_len=max_len)
    return {"cacc": res["cacc"], "asr": res["asr"], "asr_floor": res["asr_floor"], "test_size": len(test),
            "poison_test_size": len(ptest)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/victims.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    results = {}
    for attack in args.attacks:
        t0 = time.perf_counter()
        model, tok, info = victim_for(attack, args.rate, data_dir=args.data_dir)
        res = evaluate(model, tok, attack, args.data_dir)
        res.update(train_seconds=info["train_seconds"], cached=info["cached"], path=info["path"],
                   total_seconds=round(time.perf_counter() - t0, 1))
        results[attack] = res
        print(json.dumps({attack: res}), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": SST2_VICTIM.__dict__, "rate": args.rate, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

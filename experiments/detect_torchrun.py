"""`dupfast.detect` on a tiny model, in one process or sharded under torchrun; writes the result as JSON.

    python -m experiments.detect_torchrun --out runs/detect_1proc.json
    python -m torch.distributed.run --nproc_per_node 2 -m experiments.detect_torchrun --out runs/detect_2proc.json

The model is the 2-layer BERT of tests/tiny_models.py (seeded: every rank builds the same weights). The clean
set and the pool are token rows with an `idx` (global sample id); under torchrun each rank keeps the
rank-strided shard (ids rank, rank + world, ...) of both, so every rank's loaders are different data.
A third of the pool carries the inserted trigger word "cf". Rank 0 writes the JSON (scores, flags, index,
threshold, weights, world size); `--compare other.json` then checks flags and scores against another run.
"""
import argparse
import json
import pathlib
import random
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models


def rows(tok, samples, ids, with_labels):
    out = []
    for i in ids:
        text, label = samples[i]
        enc = tok(text, truncation=True, max_length=32)
        row = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "token_type_ids": enc["token_type_ids"], "idx": i}
        if with_labels:
            row["labels"] = label
        out.append(row)
    return out


def batches(tok, rows_, batch_size):
    from transformers import DataCollatorWithPadding
    collate = DataCollatorWithPadding(tok, return_tensors="pt")
    return [collate(rows_[i:i + batch_size]) for i in range(0, len(rows_), batch_size)]


def data(n_clean, n_pool, seed=0):
    from tiny_models import sentiment_samples
    clean = [(s.text, s.label) for s in sentiment_samples(n_clean, seed=seed)]
    rng = random.Random(seed + 1)
    pool = []
    for i, s in enumerate(sentiment_samples(n_pool, seed=seed + 2)):
        words = s.text.split()
        if i % 3 == 0:  # poisoned: the trigger word at a random position
            words.insert(rng.randint(0, len(words)), "cf")
        pool.append((" ".join(words), s.label))
    return clean, pool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-clean", type=int, default=200)
    ap.add_argument("--n-pool", type=int, default=90)
    ap.add_argument("--mode", default="default")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard", choices=("rows", "batches"), default="rows",
                    help="rows: rank-strided rows, batched per rank (other padding than one process); batches: "
                         "the one-process batches dealt round-robin (the same forward passes)")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--compare", help="another run's JSON: exit 1 unless flags are equal and scores match")
    args = ap.parse_args(argv)

    from dupfast import distributed as D
    import dupfast
    from tiny_models import tiny_classifier

    D.init_from_env()
    rank, world = D.rank(), D.world_size()
    torch.set_num_threads(1)
    rc = 0
    try:
        model, tok = tiny_classifier("bert", seed=0)
        clean, pool = data(args.n_clean, args.n_pool)
        if args.shard == "rows":
            clean_b = batches(tok, rows(tok, clean, range(rank, len(clean), world), True), args.batch_size)
            pool_b = batches(tok, rows(tok, pool, range(rank, len(pool), world), False), args.batch_size)
        else:
            clean_b = batches(tok, rows(tok, clean, range(len(clean)), True), args.batch_size)[rank::world]
            pool_b = batches(tok, rows(tok, pool, range(len(pool)), False), args.batch_size)[rank::world]
        result = dupfast.detect(model, pool_b, clean=clean_b, mode=args.mode)
        result = result.sorted_by_index()
        out = {"world_size": world, "rank": rank, "mode": args.mode, "shard": args.shard, "n_pool": args.n_pool,
               "n_result": len(result), "index": result.index.tolist(), "scores": result.scores.tolist(),
               "flags": result.flags.tolist(), "threshold": result.threshold, "weights": list(result.weights),
               "flagged": int(result.flags.sum())}
        if rank == 0:
            path = pathlib.Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out))
            print(json.dumps({k: out[k] for k in ("world_size", "n_result", "flagged", "threshold")}))
            if args.compare:
                diff = compare(json.loads(pathlib.Path(args.compare).read_text()), out, args.rtol)
                print(json.dumps(diff))
                rc = 0 if diff["same"] else 1
        if D.initialized():
            # tear down together: a rank that destroyed its gloo group while rank 0 was still writing and
            # comparing aborted at exit ("terminate called without an active exception"; once, in a make test)
            import torch.distributed as dist
            dist.barrier()
    finally:
        if D.initialized():
            import torch.distributed as dist
            dist.destroy_process_group()
    return rc


def compare(a: dict, b: dict, rtol: float = 1e-6) -> dict:
    """Flags and index equal; scores and threshold within rtol (relative to the largest |score|)."""
    same_index = a["index"] == b["index"]
    sa, sb = torch.tensor(a["scores"], dtype=torch.float64), torch.tensor(b["scores"], dtype=torch.float64)
    scale = max(sa.abs().max().item(), 1e-300) if sa.numel() else 1.0
    diff = (sa - sb).abs().max().item() / scale if sa.shape == sb.shape and sa.numel() else float("inf")
    tdiff = abs(a["threshold"] - b["threshold"]) / scale
    out = {"same_index": same_index, "same_flags": a["flags"] == b["flags"], "max_rel_score_diff": diff,
           "rel_threshold_diff": tdiff, "bitwise_scores": a["scores"] == b["scores"]}
    out["same"] = bool(same_index and out["same_flags"] and diff <= rtol and tdiff <= rtol)
    return out


if __name__ == "__main__":
    sys.exit(main())

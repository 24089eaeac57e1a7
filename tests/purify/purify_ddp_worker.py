"""Rank body of the two-process purification test (a module of its own so spawn can import it)."""
import json
import os

import torch

DDP_CFG = dict(epochs=4, batch_size=16, holdout_fraction=0.25, dropout=False, lora_dropout=0.0, lora_r=4,
               lora_alpha=8, lr=5e-3, start="sharpen", progress=False, patience=2, select_best=False)


def shard_batches(rows, labels, rank, world, batch_size):
    """Rank-strided shard with the global row ids in `index`."""
    from purify_helpers import batches
    mine = list(range(rank, len(rows), world))
    out = batches([rows[i] for i in mine], None if labels is None else [labels[i] for i in mine], batch_size)
    for b, start in zip(out, range(0, len(mine), batch_size)):
        b["index"] = torch.as_tensor(mine[start:start + batch_size])
    return out


def problem():
    from purify_helpers import toy_rows
    pool, _ = toy_rows(24, 11)
    clean, labels = toy_rows(24, 12)
    flags = torch.zeros(24, dtype=torch.bool)
    flags[::2] = True
    return pool, clean, labels, flags


def run_rank(rank, world, port, out_dir):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dupfast import purify
    from purify_helpers import tiny_classifier

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pool, clean, labels, flags = problem()
        model = tiny_classifier("bert", dropout=0.0)
        out, rep = purify(model, shard_batches(pool, None, rank, world, 16),
                          clean=shard_batches(clean, labels, rank, world, 16), detection=flags, **DDP_CFG)
        save_file({k: v.contiguous() for k, v in out.state_dict().items()},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"stop_reason": rep.stop_reason, "selected": rep.selected, "steps": rep.steps_run,
                       "data": rep.data, "world_size": rep.world_size,
                       "history": [(h["step"], h["agree"], h["acc"]) for h in rep.history]}, fh)
    finally:
        dist.destroy_process_group()

"""Rows for purification: the flagged pool inputs and the labelled clean inputs, unpadded, in memory.

`dupfast.batches.collect` reads the loaders (any Mapping with input_ids and attention_mask, labels for the
clean set, an optional `index` / `idx`: the global sample id, as `dupfast.detect` reads it) and strips their
padding. The detector's flags index the pool in that order: flags[index] when batches carry `index`, else
flags[running position]. Only the flagged rows and the clean rows are kept (token ids without padding), then
re-batched with right padding for training.

Held-out rows for the stopping rule are chosen by a hash of their tokens, not by position, so the split
is the same whether the data sits in one process or is sharded over several.
"""
import random
import zlib
from typing import List

import numpy as np
import torch

from ..batches import Rows
from ..distributed import is_sharded


def as_flags(detection) -> tuple:
    """(flags bool [N], ids [N] or None). detection: a `dupfast.detect` result (its flags are in the loader's
    order, its `index` the loader's ids) or flags themselves (bool tensor/array/list, indexed by row id)."""
    is_result = hasattr(detection, "flags")
    flags = detection.flags if is_result else detection
    ids = getattr(detection, "index", None) if is_result else None
    flags = torch.as_tensor(np.asarray(flags) if not isinstance(flags, torch.Tensor) else flags).cpu()
    if flags.dim() != 1:
        raise ValueError(f"flags must be a 1-D [N] vector, got shape {tuple(flags.shape)}")
    if flags.dtype != torch.bool:
        if flags.is_floating_point() or not ((flags == 0) | (flags == 1)).all():
            raise TypeError(f"flags must be booleans (or 0/1 integers), got dtype {flags.dtype}")
        flags = flags.bool()
    if ids is not None:
        ids = torch.as_tensor(ids).long().cpu().reshape(-1)
        if ids.shape != flags.shape:
            raise ValueError(f"the detection has {flags.shape[0]} flags but {ids.shape[0]} index values")
    return flags, ids


def select_flagged(rows: Rows, row_ids: torch.Tensor, detection) -> Rows:
    """The pool rows whose flag is set. A detection result is matched to the rows through its `index`;
    plain flags are indexed by row id (the loader's `index`, else the running position)."""
    if len(rows) == 0:
        raise ValueError("the pool loader yielded no rows (empty pool)")
    if row_ids.unique().numel() != row_ids.numel():
        raise ValueError("the pool loader yielded the same `index` twice")
    flags, ids = as_flags(detection)
    if ids is not None:
        by_id = dict(zip(ids.tolist(), flags.tolist()))
        missing = [i for i in row_ids.tolist() if i not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} pool rows (ids {missing[:5]}...) have no flag in the detection: it "
                             "was computed on another pool (or another shard)")
        return rows.subset(i for i, r in enumerate(row_ids.tolist()) if by_id[r])
    # sharded, each rank's loader is a shard indexed into the global flags by `index`: counts differ
    if len(rows) != flags.shape[0] and not is_sharded():
        raise ValueError(f"the detection has {flags.shape[0]} flags but the pool loader yielded {len(rows)} rows: "
                         "pass the same pool (in the same order) that was given to dupfast.detect")
    if row_ids.numel() and (row_ids.min() < 0 or row_ids.max() >= flags.shape[0]):
        raise ValueError(f"pool row ids reach {int(row_ids.max())} but the detection has only {flags.shape[0]} "
                         "flags: the detection was computed on another pool (or another shard)")
    return rows.subset(torch.nonzero(flags[row_ids]).flatten().tolist())


def require_clean_rows(rows: Rows):
    # label values were checked batch by batch against the model's label space (dupfast.batches)
    if len(rows) == 0:
        raise ValueError("the clean loader yielded no rows (empty clean set)")


def row_hash(ids: List[int]) -> float:
    """A number in [0, 1) fixed by the tokens of a row."""
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes()) / 2 ** 32


def split_holdout(rows: Rows, fraction: float):
    """(train, holdout) by token hash: identical rows always land on the same side."""
    held = [i for i, ids in enumerate(rows.ids) if row_hash(ids) < fraction]
    held_set = set(held)
    return rows.subset(i for i in range(len(rows)) if i not in held_set), rows.subset(held)


def pad(rows: Rows, idx, pad_id: int, device):
    """Right-padded model inputs for rows[idx]."""
    seqs = [rows.ids[i] for i in idx]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if rows.type_ids is not None:
        types = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, i in enumerate(idx):
            types[r, :len(rows.type_ids[i])] = torch.as_tensor(rows.type_ids[i])
        out["token_type_ids"] = types.to(device)
    return out


def concat_inputs(a: dict, b: dict, pad_id: int) -> dict:
    """Stack two right-padded input dicts into one batch (one forward: one DDP reduction per step)."""
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out = {}
    for key in a:
        fill = pad_id if key == "input_ids" else 0
        parts = [torch.nn.functional.pad(x[key], (0, T - x[key].shape[1]), value=fill) for x in (a, b)]
        out[key] = torch.cat(parts)
    return out


def index_batches(n: int, batch_size: int, shuffle: bool, seed: int):
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]

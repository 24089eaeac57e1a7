"""Rows for purification: the flagged pool inputs and the labelled clean inputs, unpadded, in memory.

A loader is read once by `dupfast.batches.collect` (any Mapping with input_ids and attention_mask, labels for
the clean set, an optional `index` / `idx`: the sample id, as `dupfast.detect` reads it), which strips its
padding; token rows (`dupfast.batches.Rows`, e.g. tokenised by the command line) are taken as they are. Every
row is checked against the model here, before purification touches it. The detector's flags are matched to
the pool rows: a detection result through its `index` (else its order), plain flags by row id (the loader's
`index`, else the running position). Only the flagged and the clean rows are kept, and padded once, by `pad`,
for each forward.

Held-out rows for the stopping rule are chosen by a hash of their tokens, not by position, so the split
is the same whether the data sits in one process or is sharded over several.
"""
import dataclasses
import random
import zlib
from typing import List, Optional

import numpy as np
import torch

from ..batches import Rows, check_rows, collect
from ..distributed import is_sharded


def read_rows(loader, name: str, model, need_labels: bool = False, num_labels: Optional[int] = None):
    """(Rows, row ids [n] long) of a loader (every batch checked by `dupfast.batches`) or of `Rows` (the same
    checks on the rows). Row ids: the `index` values, else the positions."""
    if not isinstance(loader, Rows):
        return collect(loader, name, need_labels=need_labels, model=model, num_labels=num_labels)
    rows = loader
    if any(len(r) == 0 for r in rows.ids):
        raise ValueError(f"the {name} rows hold an empty row (row {next(i for i, r in enumerate(rows.ids) if not r)})")
    if rows.type_ids is not None and [len(r) for r in rows.type_ids] != [len(r) for r in rows.ids]:
        raise ValueError(f"the {name} rows' type_ids and ids differ in length")
    check_rows(rows, model, f"the {name} rows")
    if need_labels:
        if rows.labels is None:
            raise ValueError(f"the {name} rows have no labels: this set must be labelled")
        labels = torch.as_tensor(rows.labels)
        if labels.shape != (len(rows),) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"the {name} rows need one integer label a row, got {labels.dtype} {tuple(labels.shape)}")
        bad = sorted({int(v) for v in labels.tolist() if not 0 <= v < num_labels})
        if bad:
            raise ValueError(f"the {name} rows' labels {bad} lie outside the model's label space [0, {num_labels})")
        rows = dataclasses.replace(rows, labels=labels.long())
    ids = torch.arange(len(rows)) if rows.index is None else torch.as_tensor(rows.index).long().reshape(-1)
    if ids.shape[0] != len(rows):
        raise ValueError(f"the {name} rows have {ids.shape[0]} index values for {len(rows)} rows")
    return rows, ids


@dataclasses.dataclass
class Match:
    """The detection matched to the pool rows (in the pool's order)."""
    flags: torch.Tensor                      # [n] bool: the row is flagged
    logits: Optional[torch.Tensor] = None    # [n, C] the detection's logits of each row (a result that has them)


def as_flags(detection) -> tuple:
    """(flags bool [N], ids [N] or None, logits [N, C] or None). detection: a `dupfast.detect` result (its flags
    and logits are in the loader's order, its `index` the loader's ids) or flags (bool tensor/array/list,
    indexed by row id)."""
    is_result = hasattr(detection, "flags")
    flags = detection.flags if is_result else detection
    ids = getattr(detection, "index", None) if is_result else None
    logits = getattr(detection, "logits", None) if is_result else None
    if not isinstance(flags, torch.Tensor):
        flags = np.asarray(flags)
        if flags.dtype.kind not in "biuf":  # strings ("True"), None, objects: torch would raise its own error
            shown = ", ".join(repr(v) for v in flags.reshape(-1)[:3].tolist())
            raise TypeError(f"detection flags must be booleans (or 0/1 integers), got {flags.dtype} values "
                            f"[{shown}{', ...' if flags.size > 3 else ''}]: pass a bool vector (a list of True/False, "
                            "a torch.bool tensor) or a dupfast.detect result, not strings")
    flags = torch.as_tensor(flags).cpu()
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
        uniq, counts = torch.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"the detection's index holds the sample id {int(uniq[counts > 1][0])} more than once: "
                             "it is not the result of one pass over one pool")
    if logits is not None:
        logits = torch.as_tensor(logits).detach().cpu()
        if logits.dim() != 2 or logits.shape[0] != flags.shape[0]:
            raise ValueError(f"the detection's logits {tuple(logits.shape)} do not match its {flags.shape[0]} flags")
    return flags, ids, logits


def match_detection(row_ids: torch.Tensor, detection) -> Match:
    """Match a detection to the pool rows (ids `row_ids`). A result with an `index` is matched by id and must
    cover exactly the pool's ids (in one process; under torch.distributed, at least this shard's); without one
    it must have one flag a row, in the pool's order. Plain flags are indexed by row id."""
    n = row_ids.numel()
    if n == 0:
        raise ValueError("the pool loader yielded no rows (empty pool)")
    if row_ids.unique().numel() != n:
        raise ValueError("the pool loader yielded the same `index` twice")
    flags, ids, logits = as_flags(detection)
    if ids is not None:
        position = {i: p for p, i in enumerate(ids.tolist())}
        missing = [i for i in row_ids.tolist() if i not in position]
        if missing:
            raise ValueError(f"{len(missing)} pool rows (ids {missing[:5]}...) have no flag in the detection: it "
                             "was computed on another pool (or another shard)")
        if not is_sharded() and flags.shape[0] != n:
            raise ValueError(f"the detection covers {flags.shape[0]} samples but the pool loader yielded {n} rows: "
                             "it was computed on another pool; pass the pool that was given to dupfast.detect")
        pos = torch.as_tensor([position[i] for i in row_ids.tolist()], dtype=torch.long)
    else:
        # sharded, each rank's loader is a shard indexed into the global flags by `index`: counts differ
        if n != flags.shape[0] and not is_sharded():
            raise ValueError(f"the detection has {flags.shape[0]} flags but the pool loader yielded {n} rows: "
                             "pass the same pool (in the same order) that was given to dupfast.detect")
        if row_ids.min() < 0 or row_ids.max() >= flags.shape[0]:
            raise ValueError(f"pool row ids reach {int(row_ids.max())} but the detection has only {flags.shape[0]} "
                             "flags: the detection was computed on another pool (or another shard)")
        pos = row_ids
    return Match(flags[pos], None if logits is None else logits[pos])


def require_clean_rows(rows: Rows):
    # label values were checked batch by batch against the model's label space (dupfast.batches)
    if len(rows) == 0:
        raise ValueError("the clean loader yielded no rows (empty clean set)")


def row_hash(ids: List[int]) -> float:
    """A number in [0, 1) fixed by the tokens of a row."""
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes()) / 2 ** 32


def split_holdout(rows: Rows, fraction: float):
    """(train positions, held-out positions) by token hash: identical rows always land on the same side."""
    held = [i for i, ids in enumerate(rows.ids) if row_hash(ids) < fraction]
    held_set = set(held)
    return [i for i in range(len(rows)) if i not in held_set], held


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


def pad_pair(a: Rows, a_idx, b: Rows, b_idx, pad_id: int, device):
    """rows a[a_idx] then b[b_idx] as one right-padded batch (one forward: one DDP reduction per step)."""
    if not b_idx:
        return pad(a, a_idx, pad_id, device)
    if not a_idx:
        return pad(b, b_idx, pad_id, device)
    return concat_inputs(pad(a, a_idx, pad_id, device), pad(b, b_idx, pad_id, device), pad_id)


def concat_inputs(a: dict, b: dict, pad_id: int) -> dict:
    """Stack two right-padded input dicts into one batch."""
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out = {}
    for key in dict.fromkeys([*a, *b]):  # token_type_ids of one set only: zeros (the default) for the other
        fill = pad_id if key == "input_ids" else 0
        parts = [torch.nn.functional.pad(x[key] if key in x else torch.zeros_like(x["input_ids"]),
                                         (0, T - x["input_ids"].shape[1]), value=fill) for x in (a, b)]
        out[key] = torch.cat(parts)
    return out


def index_batches(n: int, batch_size: int, shuffle: bool, seed: int):
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]

"""Rows for purification: the flagged pool inputs and the labelled clean inputs, unpadded, in memory.

Loaders yield dicts with input_ids and attention_mask (+ labels for the clean set, + optional `index`,
the global sample id, as `dupfast.detect` reads it). The detector's flags index the pool in that order:
flags[index] when batches carry `index`, else flags[running position]. Only the flagged rows and the
clean rows are kept (token ids without padding), then re-batched with right padding for training.

Held-out rows for the stopping rule are chosen by a hash of their tokens, not by position, so the split
is the same whether the data sits in one process or is sharded over several.
"""
import dataclasses
import random
import zlib
from typing import Iterable, List, Optional

import numpy as np
import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Rows:
    """Unpadded token rows; `labels` [n] long for clean rows, None for flagged pool rows."""
    ids: List[List[int]]
    type_ids: Optional[List[List[int]]] = None
    labels: Optional[torch.Tensor] = None

    def __len__(self):
        return len(self.ids)

    def subset(self, idx) -> "Rows":
        idx = list(idx)
        return Rows([self.ids[i] for i in idx],
                    None if self.type_ids is None else [self.type_ids[i] for i in idx],
                    None if self.labels is None else self.labels[idx] if idx else self.labels[:0])


def _check_batch(batch, where: str):
    if not isinstance(batch, dict):
        raise TypeError(f"{where}: loaders must yield dicts with input_ids and attention_mask, "
                        f"got {type(batch).__name__}")
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            raise ValueError(f"{where} has no {key!r} (keys: {sorted(batch)}); purification needs input_ids and "
                             "attention_mask to strip the padding of each row")
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{where}: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be "
                         "the same [B, T] shape")
    if ids.shape[0] and (mask.sum(1) == 0).any():
        raise ValueError(f"{where}: a row of attention_mask is all zeros (an empty input)")
    return ids, mask


def collect(loader: Iterable, name: str, need_labels: bool = False):
    """Read every batch once. Returns (Rows with all rows, row ids [n] long: `index` or running position)."""
    if loader is None:
        raise ValueError(f"the {name} loader is None")
    ids_out, types_out, labels_out, row_ids = [], [], [], []
    has_types, pos = None, 0
    for b, batch in enumerate(loader):
        where = f"{name} batch {b}"
        ids, mask = _check_batch(batch, where)
        n = ids.shape[0]
        types = batch.get("token_type_ids")
        if has_types is None:
            has_types = types is not None
        elif has_types != (types is not None):
            raise ValueError(f"{where}: token_type_ids present in some batches and not in others")
        if need_labels:
            if "labels" not in batch:
                raise ValueError(f"{where} has no 'labels': the clean set must be labelled")
            lab = torch.as_tensor(batch["labels"]).long().reshape(-1)
            if lab.shape[0] != n:
                raise ValueError(f"{where}: {lab.shape[0]} labels for {n} rows")
            labels_out.append(lab.cpu())
        if "index" in batch:
            index = torch.as_tensor(batch["index"]).long().reshape(-1).cpu()
            if index.shape[0] != n:
                raise ValueError(f"{where}: {index.shape[0]} index values for {n} rows")
            row_ids.append(index)
        else:
            row_ids.append(torch.arange(pos, pos + n))
        keep = mask.bool().cpu()
        ids_cpu = ids.cpu()
        for r in range(n):
            ids_out.append(ids_cpu[r][keep[r]].tolist())
            if has_types:
                types_out.append(torch.as_tensor(types)[r].cpu()[keep[r]].tolist())
        pos += n
    rows = Rows(ids_out, types_out if has_types else None,
                torch.cat(labels_out) if need_labels and labels_out else
                (torch.zeros(0, dtype=torch.long) if need_labels else None))
    return rows, torch.cat(row_ids) if row_ids else torch.zeros(0, dtype=torch.long)


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
    if len(rows) != flags.shape[0] and not _is_sharded():
        raise ValueError(f"the detection has {flags.shape[0]} flags but the pool loader yielded {len(rows)} rows: "
                         "pass the same pool (in the same order) that was given to dupfast.detect")
    if row_ids.numel() and (row_ids.min() < 0 or row_ids.max() >= flags.shape[0]):
        raise ValueError(f"pool row ids reach {int(row_ids.max())} but the detection has only {flags.shape[0]} "
                         "flags: the detection was computed on another pool (or another shard)")
    return rows.subset(torch.nonzero(flags[row_ids]).flatten().tolist())


def _is_sharded() -> bool:
    # under torch.distributed each rank's loader is a shard, indexed into the global flags by `index`
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_labels(rows: Rows, num_labels: int):
    if len(rows) == 0:
        raise ValueError("the clean loader yielded no rows (empty clean set)")
    y = rows.labels
    if y.min() < 0 or y.max() >= num_labels:
        bad = sorted({int(v) for v in y[(y < 0) | (y >= num_labels)].tolist()})
        raise ValueError(f"clean labels {bad} lie outside the model's label space [0, {num_labels}) "
                         f"(config.num_labels = {num_labels})")


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

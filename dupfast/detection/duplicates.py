"""Duplicates in a pool: one sample for every pool statistic, every copy scored as its sample.

Users' data holds copies (the same review scraped twice, a template repeated). Pool statistics that count
rows — the transductive projection's mean shift, the adaptive fusion's excess counts, the poison-presence
test and the pool's own threshold — would otherwise read k copies of one input as k independent pieces of
evidence: a clean review repeated 8 times moved the pool mean toward itself and all 8 copies were flagged.

Inputs are identified by the token ids of their real tokens (padding and its side do not matter), hashed to
one int64 per input at capture time, so nothing of the texts is kept.
"""
import dataclasses
import hashlib
from typing import Optional

import torch

from .. import distributed as D


def input_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] token ids and mask -> [B] int64 keys, equal exactly when the real-token sequences are equal."""
    ids = input_ids.detach().cpu().to(torch.int64)
    mask = attention_mask.detach().cpu().bool()
    keys = []
    for row, m in zip(ids, mask):
        digest = hashlib.blake2b(row[m].numpy().tobytes(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(keys, dtype=torch.int64)


@dataclasses.dataclass
class Groups:
    """This rank's rows grouped by key. representative[i]: the local row whose scores row i takes (itself
    for a first copy); unique[i]: row i is the first copy (counts once); counts[i]: copies of row i's input in
    the whole pool (all ranks); n_unique: distinct inputs in the whole pool."""
    representative: torch.Tensor
    unique: torch.Tensor
    counts: torch.Tensor
    n_unique: int

    @property
    def weights(self) -> torch.Tensor:
        """1 / copies per row: summed over a group, one sample."""
        return 1.0 / self.counts.double()

    @property
    def n_copies(self) -> int:
        return int(self.unique.numel()) - int(self.unique.sum())


def group(keys: torch.Tensor, index: Optional[torch.Tensor] = None) -> Groups:
    """Group this rank's rows by `keys` [N] (rows without keys: `no_groups`). Under torch.distributed the first
    copy is the one with the smallest global `index` over all ranks; a copy whose first copy sits on another rank
    keeps its own (numerically equal) scores but still counts as part of one sample."""
    keys = keys.long().cpu()
    n = keys.numel()
    if not D.is_sharded():
        _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        first = torch.full((counts.numel(),), n, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(n), reduce="amin")
        rep = first[inverse]
        return Groups(rep, rep == torch.arange(n), counts[inverse], int(counts.numel()))
    ids = torch.as_tensor(index).long().cpu()
    all_keys, all_ids = D.all_gather_rows(keys), D.all_gather_rows(ids)
    uniq, inverse, counts = torch.unique(all_keys, return_inverse=True, return_counts=True)
    first_id = torch.full((uniq.numel(),), int(all_ids.max()) + 1, dtype=torch.long).scatter_reduce(
        0, inverse, all_ids, reduce="amin")
    mine = torch.searchsorted(uniq, keys)
    unique = first_id[mine] == ids
    local_first = {}
    for i, (k, u) in enumerate(zip(keys.tolist(), unique.tolist())):
        if u:
            local_first[k] = i
    rep = torch.tensor([local_first.get(k, i) for i, k in enumerate(keys.tolist())], dtype=torch.long)
    return Groups(rep, unique, counts[mine], int(uniq.numel()))


def no_groups(n: int) -> Groups:
    """Every one of the n rows distinct (no keys captured)."""
    n_all = int(D.all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)))
    return Groups(torch.arange(n), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.long), n_all)

"""Scoring a pool with a fitted scorer and calibration: per-batch z-scores, then one assembly.

A batch is scored as soon as its forward pass returns (`score_batch`): raw columns z-normalised, the
reported per-layer values moved to the CPU, the features dropped except those the transductive projection
needs. `assemble` then adds the projection columns (which need the whole pool), fuses and flags. `stream_scores`
does both for batches as they come, moving each batch's projection features into `PoolFeatures`
(transductive.py: memory up to a budget, then a temporary file) so nothing of a batch but its scores stays.
"""
import dataclasses
from typing import Optional

import torch

from ..heap import Trimmer
from .calibration import Calibration, fuse
from .checks import check_ids
from .result import DetectionResult
from .transductive import PoolFeatures


@dataclasses.dataclass
class ScoredBatch:
    z: torch.Tensor                          # [B, m] z-normalised columns
    reported: dict                           # layer_distances / cosines / concentration, [B, ...] each
    projection: dict                         # {pooling: (features [B, L, d], ‖z‖² [B, L])}
    logits: Optional[torch.Tensor]
    index: Optional[torch.Tensor]


def score_batch(scorer, calibration: Calibration, features: dict, logits=None, index=None) -> ScoredBatch:
    out = scorer.score(features, logits)
    z = calibration.znorm(out.columns.double().cpu())
    proj = {p: (features[p].detach().cpu(), out.sq_norms[p].detach().cpu()) for p in scorer.projection_poolings}
    reported = {k: getattr(out, k).detach().cpu() for k in ("layer_distances", "cosines", "concentration")
                if getattr(out, k) is not None}
    return ScoredBatch(z, reported, proj, None if logits is None else logits.detach().cpu(),
                       None if index is None else torch.as_tensor(index).long())


def stream_scores(batches, score, scorer, calibration: Calibration, memory_bytes: int) -> DetectionResult:
    """score(captured batch) -> ScoredBatch for each batch as it comes; then `assemble`. memory_bytes bounds the
    projection features kept in memory, all projection poolings together (each gets an equal share)."""
    share = memory_bytes // max(1, len(scorer.projection_poolings))
    kept = {p: PoolFeatures(share) for p in scorer.projection_poolings}
    trim = Trimmer()
    try:
        parts = []
        for cb in batches:
            part = score(cb)
            for p, store in kept.items():
                store.append(part.projection[p][0])
                part.projection[p] = (None, part.projection[p][1])
            parts.append(part)
            trim()  # the batch's freed temporaries sit below its kept scores: see heap.py
        if not parts:
            raise ValueError("no batches to score (empty data set)")
        return assemble(parts, scorer, calibration, kept)
    finally:
        for store in kept.values():
            store.close()


def assemble(parts, scorer, calibration: Calibration, kept: dict = None) -> DetectionResult:
    """kept: {pooling: PoolFeatures} where `stream_scores` moved the projection features (else in `parts`)."""
    z, val_z = torch.cat([p.z for p in parts]), calibration.val_z
    names = tuple(scorer.component_names)
    if scorer.projection_poolings:
        feats = lambda k: kept[k] if kept else torch.cat([p.projection[k][0] for p in parts])  # noqa: E731
        pool = {k: (feats(k), torch.cat([p.projection[k][1] for p in parts])) for k in scorer.projection_poolings}
        zt, val_zt = calibration.projection_z(scorer, pool)
        z, val_z = torch.cat([z, zt], 1), torch.cat([val_z, val_zt], 1)
        names += tuple(scorer.projection_names)
    weights, threshold = calibration.fusion(z, val_z, scorer.weights, scorer.adaptive)
    scores = fuse(z, weights)
    bad = ~torch.isfinite(scores)
    if bad.any() or not torch.isfinite(torch.tensor(threshold)):
        raise ValueError(f"{int(bad.sum())} of {scores.numel()} scores (threshold {threshold}) are NaN or inf: the "
                         "detector's statistics are not finite (a corrupt saved detector?); nothing was flagged")
    cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
    index = cat([p.index for p in parts])
    check_ids(index, "the pool")
    reported = {k: torch.cat([p.reported[k] for p in parts]) for k in parts[0].reported}
    trans = {k: reported[k] for k in ("cosines", "concentration") if k in reported} or None
    return DetectionResult(scores=scores, flags=scores > threshold, threshold=threshold,
                           weights=tuple(weights.tolist()), components=z, component_names=names,
                           selected_layers=list(scorer.layers) if scorer.layers is not None else [],
                           layer_distances=reported.get("layer_distances"), transitions=trans,
                           logits=cat([p.logits for p in parts]), index=index)

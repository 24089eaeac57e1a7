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

from .. import distributed as D
from ..heap import Trimmer
from .calibration import Calibration, fuse
from .checks import check_ids
from .duplicates import group, no_groups
from .result import DetectionResult
from .transductive import PoolFeatures
from .verdict import ADAPTIVE_SHARE, decide

GAP_COLUMNS = ("attn",)  # score columns the verdict's gap test reads on their own, beside the fused scores


@dataclasses.dataclass
class ScoredBatch:
    z: torch.Tensor                          # [B, m] z-normalised columns
    reported: dict                           # layer_distances / cosines / concentration, [B, ...] each
    projection: dict                         # {pooling: (features [B, L, d], ‖z‖² [B, L])}
    logits: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    keys: Optional[torch.Tensor] = None      # [B] int64 input keys (duplicates.py)
    top_tokens: Optional[torch.Tensor] = None  # [B] int64 most-attended token ids (attention.py)


def score_batch(scorer, calibration: Calibration, features: dict, logits=None, index=None,
                keys=None, top_tokens=None) -> ScoredBatch:
    out = scorer.score(features, logits)
    z = calibration.znorm(out.columns.double().cpu())
    proj = {p: (features[p].detach().cpu(), out.sq_norms[p].detach().cpu()) for p in scorer.projection_poolings}
    reported = {k: getattr(out, k).detach().cpu() for k in ("layer_distances", "cosines", "concentration")
                if getattr(out, k) is not None}
    return ScoredBatch(z, reported, proj, None if logits is None else logits.detach().cpu(),
                       None if index is None else torch.as_tensor(index).long(),
                       None if keys is None else torch.as_tensor(keys).long().cpu(),
                       None if top_tokens is None else torch.as_tensor(top_tokens).long().cpu())


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
    """kept: {pooling: PoolFeatures} where `stream_scores` moved the projection features (else in `parts`).
    Copies of one input (same token ids) count once in every pool statistic and all take the first copy's
    scores; the threshold and the poison verdict come from verdict.decide on the distinct inputs."""
    z, val_z = torch.cat([p.z for p in parts]), calibration.val_z
    cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
    index, keys = cat([p.index for p in parts]), cat([p.keys for p in parts])
    check_ids(index, "the pool")
    groups = no_groups(z.shape[0]) if keys is None else group(keys, index)
    names = tuple(scorer.component_names)
    if scorer.projection_poolings:
        feats = lambda k: kept[k] if kept else torch.cat([p.projection[k][0] for p in parts])  # noqa: E731
        pool = {k: (feats(k), torch.cat([p.projection[k][1] for p in parts])) for k in scorer.projection_poolings}
        zt, val_zt = calibration.projection_z(scorer, pool, groups.weights)
        z, val_z = torch.cat([z, zt], 1), torch.cat([val_z, val_zt], 1)
        names += tuple(scorer.projection_names)
    z = z[groups.representative]  # every copy takes its first copy's scores (equal up to padding round-off)
    n_rows = int(D.all_reduce_sum(torch.tensor(float(z.shape[0]), dtype=torch.float64)))

    def fused(adaptive):
        weights, clean_threshold = calibration.fusion(z, val_z, scorer.weights, adaptive, groups.unique)
        scores = fuse(z, weights)[groups.representative]  # bitwise equal copies (a GEMV rounds rows unequally)
        bad = ~torch.isfinite(scores)
        if bad.any() or not torch.isfinite(torch.tensor(clean_threshold)):
            raise ValueError(f"{int(bad.sum())} of {scores.numel()} scores (threshold {clean_threshold}) are NaN or "
                             "inf: the detector's statistics are not finite (a corrupt saved detector?); nothing was "
                             "flagged")
        distinct = D.all_gather_rows(scores[groups.unique].unsqueeze(1)).flatten()
        # the attention column alone also goes to the verdict's gap test (verdict.py): a token trigger stands apart there
        gap = [D.all_gather_rows(z[groups.unique, names.index(c)].unsqueeze(1)).flatten() for c in GAP_COLUMNS
               if c in names]
        val_scores = fuse(val_z, weights)
        verdict = decide(val_scores, distinct, calibration.frr, clean_threshold, calibration.rule, n_rows,
                         calibration.calibrated, gap)
        return weights, scores, val_scores, verdict

    # the verdict reads the fixed combination: adaptive weights are chosen on this very pool, so its tail would be
    # tested against a clean tail they were not chosen on (measured: 70% false alarms on clean SST-2 pools)
    weights, scores, val_scores, verdict = fused(False)
    rule = calibration.fusion_rule
    gated = verdict.poison_present and verdict.poison_mass >= ADAPTIVE_SHARE
    if scorer.adaptive and (rule == "adaptive" or (rule == "auto" and gated)):
        weights, scores, val_scores, adapted = fused(True)
        verdict = dataclasses.replace(adapted, poison_present=verdict.poison_present, p_value=verdict.p_value)
    threshold = verdict.threshold
    flags = scores > threshold
    verdict.n_flagged = int(D.all_reduce_sum(flags.double().sum()))
    reported = {k: torch.cat([p.reported[k] for p in parts])[groups.representative] for k in parts[0].reported}
    trans = {k: reported[k] for k in ("cosines", "concentration") if k in reported} or None
    return DetectionResult(scores=scores, flags=flags, threshold=threshold, verdict=verdict,
                           validation_scores=val_scores, copies=groups.counts,
                           weights=tuple(weights.tolist()), components=z, component_names=names,
                           selected_layers=list(scorer.layers) if scorer.layers is not None else [],
                           layer_distances=reported.get("layer_distances"), transitions=trans,
                           logits=cat([p.logits for p in parts]), index=index,
                           top_tokens=cat([p.top_tokens for p in parts]))

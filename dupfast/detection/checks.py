"""Input checks at the detector's boundary: features, sample ids, the model a fitted detector meets, and the
finiteness of what each forward pass returns."""
from typing import Optional

import torch

from .. import distributed as D
from ..batches import model_num_labels


def check_features(features: dict, poolings) -> tuple:
    """features {pooling: [N, L, d]} holding every pooling in `poolings`, non-empty and finite -> (L, d)."""
    if not isinstance(features, dict):
        raise TypeError(f"features must be a dict {{pooling: [N, L, d] tensor}}, got {type(features).__name__}")
    missing = [p for p in poolings if p not in features]
    if missing:
        hint = " (pooling='auto' is resolved from a model: pass pooling= explicitly with features)" \
            if "auto" in missing else ""
        raise ValueError(f"features lack pooling(s) {missing}; this scorer needs {list(poolings)}{hint}")
    shape = None
    for p in poolings:
        x = features[p]
        if p == "attn":  # the attention signal: [N, 1, L*H], its own shape (attention.py)
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != 1 or not torch.isfinite(x).all():
                raise ValueError(f"attn features must be a finite [N, 1, L*H] tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            continue
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{p} features must be a [N, L, d] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[0] == 0:
            raise ValueError("no samples: the loader or feature tensor is empty")
        if shape is not None and tuple(x.shape) != shape:
            raise ValueError(f"features of different shapes: {shape} and {p} {tuple(x.shape)}")
        shape = tuple(x.shape)
        if not torch.isfinite(x).all():
            raise ValueError(f"{p} features contain NaN or inf")
    return shape[1], shape[2]


def check_ids(index: Optional[torch.Tensor], what: str) -> None:
    """Sample ids must be unique over every rank: a repeated id would count one sample twice (in the
    calibration split, or in a pool whose results are matched back by id)."""
    if index is None:
        return
    every = D.all_gather_rows(torch.as_tensor(index).long().reshape(-1))
    uniq, counts = torch.unique(every, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        shown = ", ".join(str(int(v)) for v in dup[:5]) + (", ..." if dup.numel() > 5 else "")
        raise ValueError(f"{what} has {dup.numel()} repeated sample id(s) in its `index`/`idx` ({shown}); "
                         "each sample needs its own id (is the loader repeating samples?)")


def check_model(model, num_classes: int) -> None:
    """A fitted detector meets a model with the label space it was fitted on (before any forward pass)."""
    n = model_num_labels(model)
    if n is not None and n != num_classes:
        raise ValueError(f"the detector was fitted on a {num_classes}-class model, this model has {n} classes "
                         "(config.num_labels): fit a detector for this model")


def check_logits(logits: Optional[torch.Tensor], num_classes: int) -> None:
    if logits is not None and logits.shape[-1] != num_classes:
        raise ValueError(f"the detector was fitted on a {num_classes}-class model, these logits have "
                         f"{logits.shape[-1]} classes (another model?)")


def check_finite_rows(x: torch.Tensor, what: str, where: str, autocast: Optional[str] = None) -> None:
    """x [B, ...]: one forward's output. Raises when any input's row holds NaN or inf: left in, NaN logits reach
    the result (and purify's teacher) while the scores, computed from other tensors, still look finite."""
    bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    k = int(bad.sum())
    if not k:
        return
    rows = torch.nonzero(bad).flatten()[:5].tolist()
    hint = (f"it ran under {autocast} autocast, whose narrower range overflows first: retry with autocast=None"
            if autocast else "check torch.isfinite over the model's parameters, and load a float16 model in float32 "
                             "(keep autocast=None)")
    shown = ", ".join(map(str, rows)) + (", ..." if k > 5 else "")
    raise ValueError(f"{where}: the model produced NaN/inf {what} for {k} of {x.shape[0]} inputs (rows [{shown}]"
                     f"): a broken or overflowed model (NaN/inf weights, a bad checkpoint, "
                     f"float16 overflow) gives no usable output; {hint}")

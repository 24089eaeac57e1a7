"""The teacher's logits on the flagged and clean training rows, computed once, from the model as the caller
gave it (before any adapter: the adapter-disabled student computes exactly this), in eval mode.

A `dupfast.detect` result already holds the model's logits on every pool row, from the same eval-mode
forward; the flagged rows' teacher logits are taken from it instead of running the model over them again.
Those logits must be this model's on these rows, at this precision: a result computed with another model,
on another pool of the same size and ids, or under autocast would make the ascent push away from the wrong
targets. So before they are used, the teacher is run on a few of the flagged rows (CHECK_ROWS, spread over
them) and must reproduce the result's logits to float32 re-association accuracy (padding and batch shapes
differ between the two passes); otherwise purify stops with an error that says so (pass `detection=
result.flags` to use the flags alone; the teacher logits are then computed here).
"""
import torch

from .. import distributed as dist
from .checks import check_teacher_logits
from .rows import pad
from .trainer import eval_mode, predict_rows

CHECK_ROWS = 32
# the same model on the same rows in float32 differs only by summation order: measured max |diff| 3e-8 on the
# tiny test models, 1.9e-6 on MiniLM-L6 (160 SST-2 dev rows, logits up to 2.3); bf16 autocast differs by 8e-4
# (tiny Llama) to 2.4e-2 (MiniLM), another model or pool by far more
ATOL = RTOL = 1e-4


def probe(model, rows, pad_id, device, num_labels: int):
    """One row through the model, to fail before anything is touched on a model that is no sequence
    classifier (e.g. an AutoModel without a head: no `logits`) or whose head has another label count."""
    with eval_mode(model), torch.no_grad():
        out = model(**pad(rows, [0], pad_id, device))
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"the model ({type(model).__name__}) returned no `logits`: purify needs a sequence "
                         "classifier with its fine-tuned head (AutoModelForSequenceClassification, "
                         "e.g. dupfast.harness.models.load_model(folder)), not a bare encoder (AutoModel)")
    if logits.dim() != 2 or logits.shape[-1] != num_labels:
        raise ValueError(f"the model's logits have shape {tuple(logits.shape)}, not [batch, {num_labels}] "
                         f"(config.num_labels = {num_labels})")
    # a broken model fails here, not as "the detection's logits are not this model's" further on
    check_teacher_logits({"the first clean row": logits.detach().cpu()})


def teacher_logits(model, rows, pad_id, device) -> torch.Tensor:
    """[len(rows), C] float32 (CPU), eval mode, in row order."""
    return predict_rows(model, rows, pad_id, device)


def check_detection_logits(model, rows, logits: torch.Tensor, pad_id, device) -> dict:
    """Recompute the teacher on up to CHECK_ROWS of `rows` and compare with the detection's `logits` of the
    same rows. Returns what was compared; raises ValueError (on every rank) if they differ."""
    n = len(rows)
    k = min(CHECK_ROWS, n)
    idx = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    bad, worst = 0, 0.0
    if idx:
        fresh = teacher_logits(model, rows.subset(idx), pad_id, device)
        given = logits[idx].float()
        if given.shape != fresh.shape:
            bad = 1
        else:
            diff = (fresh - given).abs()
            worst = float(diff.max())
            bad = int(not bool((diff <= ATOL + RTOL * fresh.abs()).all()))
    bad, worst = dist.reduce_numbers([bad, worst], "max")
    if bad:
        raise ValueError(
            f"the detection's logits are not this model's on these pool rows (max difference {worst:.3g} over "
            f"{len(idx)} flagged rows checked, tolerance {ATOL:g} + {RTOL:g}·|logit|): the result was computed with "
            "another model, on another pool, or under autocast. Pass the pool and model given to dupfast.detect, "
            "or detection=result.flags to use its flags alone (the teacher logits are then computed here)")
    return {"source": "detection", "rows_checked": len(idx), "max_abs_diff": worst}


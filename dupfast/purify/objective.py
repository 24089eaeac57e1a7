"""DUP's unlearning objective on one batch:  −λ_asr · KL(p_T ‖ p_S) on flagged rows + λ_acc · CE on clean rows.

The ascent term goes through the fused KL op with signed row weights (negative = ascent, 0 = masked):
a flagged row is masked once its KL at temperature 1 exceeds `kl_cap` nats (for a confident teacher,
KL ≈ −log p_S(teacher's label), so cap 1 ≈ "until p_S(teacher's label) < e⁻¹"), so the ascent on a row
stops once the student has left the teacher by that much instead of running away (−KL is unbounded).
"""
import dataclasses

import torch
import torch.nn.functional as F

from ..ops import kl_div


@dataclasses.dataclass
class BatchLoss:
    loss: torch.Tensor          # what backward() is called on
    ascent: float               # Σ w_r·KL_r / n_flag (negative when ascending), detached
    kl_mean: float              # mean KL_r over the flagged rows of the batch
    ce: float                   # mean CE over the clean rows of the batch
    active: int                 # flagged rows still under the cap (weight != 0)
    flagged: int
    clean: int


def ascent_targets(teacher_logits: torch.Tensor, cfg) -> torch.Tensor:
    """Teacher log-probs the ascent pushes away from ("sharpen" start: sharpened by τ, so that the gradient
    at the tie, softmax(s/T) − softmax(t/(T·τ)), is not zero). They are at temperature 1: the KL op
    re-normalises log-probs at its temperature T (softmax(log p / T)), which gives softmax(t/(T·τ))."""
    tau = cfg.sharpen_temperature if cfg.start == "sharpen" else 1.0
    return F.log_softmax(teacher_logits.float() / tau, dim=-1)


def unlearning_loss(flag_logits, flag_targets, teacher_flag_logits, clean_logits, clean_labels, cfg,
                    flag_norm: float, clean_norm: float) -> BatchLoss:
    """flag_logits [F, C] student on flagged rows; flag_targets [F, C] teacher log-probs (ascent_targets);
    teacher_flag_logits [F, C] the teacher's own logits (for the cap); clean_logits [B, C], clean_labels [B].
    flag_norm / clean_norm: the row counts the sums are divided by (global over ranks under DDP)."""
    device = clean_logits.device if clean_logits is not None else flag_logits.device
    loss = torch.zeros((), device=device)
    ascent = kl_mean = ce = 0.0
    n_flag = 0 if flag_logits is None else flag_logits.shape[0]
    active = 0
    if n_flag and cfg.lambda_asr > 0:
        with torch.no_grad():
            kl_rows = kl_div(flag_logits.detach(), teacher_flag_logits, None, 1.0, "none")
        keep = torch.ones_like(kl_rows, dtype=torch.bool) if cfg.kl_cap is None else kl_rows < cfg.kl_cap
        active = int(keep.sum())
        weights = -cfg.lambda_asr * keep.float()
        term = kl_div(flag_logits, flag_targets, weights, cfg.temperature, "sum", teacher_log_probs=True) / flag_norm
        loss = loss + term
        ascent, kl_mean = float(term.detach()), float(kl_rows.mean())
    n_clean = 0 if clean_logits is None else clean_logits.shape[0]
    if n_clean and cfg.lambda_acc > 0:
        term = cfg.lambda_acc * F.cross_entropy(clean_logits.float(), clean_labels, reduction="sum") / clean_norm
        loss = loss + term
        ce = float(term.detach()) / cfg.lambda_acc
    return BatchLoss(loss, ascent, kl_mean, ce, active, n_flag, n_clean)

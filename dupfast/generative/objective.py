"""The KL over the vocabulary at every response position, and the generative unlearning objective.

    vocab_kl(hidden [R, H], lm_head_weight [V, H], teacher, weights [R], temperature) -> [R]

is the ONE function every vocabulary KL of dupfast.generative goes through. Per row r (a response position):
p_S = softmax(hidden_r W^T / T), p_T = softmax(teacher_r / T), result_r = w_r * KL(p_T || p_S), with the
semantics of `dupfast.ops.kl_div` (signed row weights: w < 0 ascent, w = 0 masks the row, w > 0 descent; the
gradient flows to `hidden`, and to W if it requires grad). `teacher` is the teacher's logits [R, V] or, cheaper
to cache, its final hidden states [R, H] (logits = teacher_hidden W^T with the same, frozen head). The body is
the fused `dupfast.ops.linear_kl_div` (LM head + KL in row chunks; the student's [R, V] logits are never
materialised, the teacher's logits are recomputed chunk by chunk from its cached hidden states).

The objective, per step, over the response positions of a batch of flagged and clean rows:

    -λ_asr·T²·mean_flagged KL_T(p_T‖p_S)  +  λ_keep·T²·mean_clean KL_T(p_T‖p_S)  +  λ_acc·mean_clean CE

the two KL parts as ONE vocab_kl call with signed weights; a flagged position is masked once its KL at
temperature 1 exceeds `kl_cap` (the ascent stops on a position the student has already left).
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import linear_kl_div


def _teacher_kind(teacher: torch.Tensor, weight: torch.Tensor, kind: str) -> str:
    V, H = weight.shape
    if teacher.dim() != 2:
        raise ValueError(f"teacher must be [R, V] logits or [R, H] hidden states, got shape {tuple(teacher.shape)}")
    if kind != "auto":
        want = V if kind == "logits" else H
        if teacher.shape[1] != want:
            raise ValueError(f"teacher {kind} have {teacher.shape[1]} columns, the model's head expects {want} "
                             f"(vocabulary {V}, hidden {H}): a teacher cache of another model (vocabulary mismatch)")
        return kind
    if V == H:
        raise ValueError("the head is square (vocabulary == hidden size): say teacher_kind='logits' or 'hidden'")
    if teacher.shape[1] == V:
        return "logits"
    if teacher.shape[1] == H:
        return "hidden"
    raise ValueError(f"the teacher has {teacher.shape[1]} columns, but the model's vocabulary has {V} tokens and its "
                     f"hidden size is {H}: a teacher cache of another model (vocabulary mismatch between teacher cache "
                     "and model)")


def vocab_kl(hidden: torch.Tensor, lm_head_weight: torch.Tensor, teacher: torch.Tensor, weights: Optional[torch.Tensor],
             temperature: float = 1.0, teacher_kind: str = "auto") -> torch.Tensor:
    """Per-row w_r · KL(softmax(teacher_r / T) ‖ softmax(hidden_r W^T / T)) [R] (module docstring)."""
    if teacher_kind not in ("auto", "logits", "hidden"):
        raise ValueError(f"teacher_kind must be 'auto', 'logits' or 'hidden', got {teacher_kind!r}")
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"hidden [R, H] and lm_head_weight [V, H] must share H, got {tuple(hidden.shape)} and "
                         f"{tuple(lm_head_weight.shape)}")
    kind = _teacher_kind(teacher, lm_head_weight, teacher_kind)
    if teacher.shape[0] != hidden.shape[0]:
        raise ValueError(f"{teacher.shape[0]} teacher rows for {hidden.shape[0]} student rows")
    if weights is not None and tuple(weights.shape) != (hidden.shape[0],):
        raise ValueError(f"weights must be [R] = [{hidden.shape[0]}], got {tuple(weights.shape)}")
    w = None if weights is None else weights.detach().float().contiguous()
    t = teacher.detach().float()
    # fused LM head + KL in row chunks: the student's [R, V] logits are never materialised
    if kind == "hidden":
        return linear_kl_div(hidden.float(), lm_head_weight.float(), teacher_hidden=t, weights=w,
                             temperature=float(temperature), reduction="none")
    return linear_kl_div(hidden.float(), lm_head_weight.float(), teacher_logits=t, weights=w,
                         temperature=float(temperature), reduction="none")


@dataclasses.dataclass
class StepLoss:
    loss: torch.Tensor
    ascent: float        # Σ weighted flagged KL (negative)
    kl_mean: float       # mean flagged KL at T = 1
    keep_kl: float       # mean clean KL at T
    ce: float            # mean clean CE
    active: int          # flagged positions under the cap
    flagged: int         # flagged positions
    clean: int           # clean positions


def generative_loss(flag_hidden, flag_teacher, clean_hidden, clean_targets, clean_teacher, weight, cfg) -> StepLoss:
    """flag_hidden [Rf, H] student final hidden states at the flagged rows' response positions, flag_teacher [Rf, H|V]
    the teacher's there (the ascent's targets: sharpened by cfg.sharpen_temperature with start='sharpen');
    clean_hidden [Rc, H], clean_targets [Rc] the next tokens, clean_teacher [Rc, H|V] (lambda_keep > 0)."""
    T, t2 = cfg.temperature, cfg.temperature ** 2
    dev = weight.device
    loss = torch.zeros((), device=dev)
    n_f = 0 if flag_hidden is None else flag_hidden.shape[0]
    n_c = 0 if clean_hidden is None else clean_hidden.shape[0]
    hs, ts, ws = [], [], []
    ascent = kl_mean = keep_kl = ce = 0.0
    active = 0
    if n_f and cfg.lambda_asr > 0:
        with torch.no_grad():
            kl1 = vocab_kl(flag_hidden.detach(), weight, flag_teacher, None, 1.0)
        keep = torch.ones_like(kl1, dtype=torch.bool) if cfg.kl_cap is None else kl1 < cfg.kl_cap
        active, kl_mean = int(keep.sum()), float(kl1.mean())
        tau = cfg.sharpen_temperature if cfg.start == "sharpen" else 1.0
        hs.append(flag_hidden)
        ts.append(flag_teacher.float() / tau)  # logits / τ; for hidden states too (the head has no bias)
        ws.append(-cfg.lambda_asr * t2 / n_f * keep.float())
    use_keep = n_c and cfg.lambda_keep > 0
    if use_keep:
        if clean_teacher is None:
            raise ValueError("lambda_keep > 0 needs the teacher on the clean rows")
        hs.append(clean_hidden)
        ts.append(clean_teacher.float())
        ws.append(torch.full((n_c,), cfg.lambda_keep * t2 / n_c, device=dev))
    if hs:
        kinds = {t.shape[1] for t in ts}
        if len(kinds) > 1:
            raise ValueError("flagged and clean teachers must both be logits or both hidden states")
        part = vocab_kl(torch.cat(hs), weight, torch.cat(ts).to(dev), torch.cat(ws).to(dev), T)
        loss = loss + part.sum()
        d = part.detach()
        nf = n_f if (n_f and cfg.lambda_asr > 0) else 0
        ascent = float(d[:nf].sum())
        keep_kl = float(d[nf:].sum()) / (cfg.lambda_keep * t2) if use_keep else 0.0
    if n_c and cfg.lambda_acc > 0:
        logits = clean_hidden.float() @ weight.float().T
        term = F.cross_entropy(logits, clean_targets.to(dev), reduction="mean")
        loss = loss + cfg.lambda_acc * term
        ce = float(term.detach())
    return StepLoss(loss, ascent, kl_mean, keep_kl, ce, active, n_f, n_c)

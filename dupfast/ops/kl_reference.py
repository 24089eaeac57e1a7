"""Pure-PyTorch weighted KL(p_T || p_S): the oracle the fused kernels are held to."""
import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def kl_div_reference(student, teacher, weights=None, temperature=1.0, reduction="batchmean",
                     teacher_log_probs=False):
    """Per row r: w_r * KL(softmax(t/T) || softmax(s/T)); reduced as torch.nn.KLDivLoss."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = teacher.float() if teacher_log_probs else F.log_softmax(teacher.float() / temperature, dim=-1)
    rows = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if weights is not None:
        rows = rows * weights.float()
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / student.numel()
    return total / student.shape[0]

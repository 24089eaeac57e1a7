"""Pure-PyTorch reference of dupfast.ops.kl_div: log_softmax + kl_div + autograd.

It is the oracle the fused backends are tested against, and what runs where no fused backend is
available. It upcasts to float32 before any arithmetic (float64 inputs stay float64: the tests use
that as the high-precision oracle and for gradcheck).
"""
import torch
import torch.nn.functional as F


def reduce_rows(row_loss, reduction, n_vocab):
    """torch.nn.KLDivLoss reductions of per-row losses [R] (the rows already summed over V)."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":  # over all R * V elements, as KLDivLoss(reduction="mean")
        return total / (row_loss.shape[0] * n_vocab)
    if reduction == "batchmean":
        return total / row_loss.shape[0]
    raise ValueError(f"reduction must be one of 'none', 'sum', 'mean', 'batchmean'; got {reduction!r}")


def kl_div_reference(student, teacher, weights=None, temperature=1.0, reduction="batchmean",
                     teacher_log_probs=False):
    """sum_r w_r * KL(softmax(t_r / T) || softmax(s_r / T)), reduced like KLDivLoss.

    Arguments are already validated by dupfast.ops.kl_div. The teacher is softmax(t / T) whether t
    holds logits or log-probabilities (softmax is shift-invariant, so re-normalised log-probs give
    the same distribution as the logits they came from), hence `teacher_log_probs` needs no branch.
    """
    del teacher_log_probs  # same formula for both, see the docstring
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(compute) / temperature
    t = teacher.to(compute) / temperature
    if weights is not None:
        # Masked rows (w == 0) must give exactly zero loss and gradient even if they hold inf/NaN:
        # zero them before the softmax instead of multiplying a possibly non-finite KL by 0.
        keep = (weights != 0).unsqueeze(1)
        s = torch.where(keep, s, 0.0)
        t = torch.where(keep, t, 0.0)
    log_ps = F.log_softmax(s, dim=-1)
    p_t = F.softmax(t, dim=-1)
    elem = F.kl_div(log_ps, p_t, reduction="none")  # p_t * (log p_t - log p_s)
    # A slot with p_t == 0 contributes 0 even where the student slot is -inf (kl_div gives NaN there).
    elem = torch.where(p_t > 0, elem, 0.0)
    row_loss = elem.sum(dim=-1)
    if weights is not None:
        row_loss = row_loss * weights.to(compute)
    return reduce_rows(row_loss, reduction, student.shape[-1])

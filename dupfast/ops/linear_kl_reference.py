"""Pure-PyTorch reference of dupfast.ops.linear_kl_div: the LM head (F.linear) + dupfast's kl_div
reference + autograd, materialising the [R, V] logits.

It is what the fused backends are tested against and what runs where none is available. The head
runs in the inputs' dtype (like `hidden @ weight.T` in user code); the KL math upcasts to float32
(float64 inputs stay float64: the tests' oracle).
"""
import torch
import torch.nn.functional as F

from .kl_reference import kl_div_reference


def masked_rows_zeroed(x, weights):
    """x with the rows whose weight is 0 set to 0: a masked row is masked entirely, even if it holds
    inf/NaN (which would otherwise reach the weight gradient as 0 * NaN)."""
    if weights is None:
        return x
    return torch.where((weights != 0).unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def linear_kl_div_reference(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                            topk_idx, topk_val, weights, temperature, reduction):
    """kl_div(hidden @ weight.T + bias, teacher logits, weights, temperature, reduction), the teacher's
    logits being `teacher_logits`, or teacher_hidden @ teacher_weight.T + teacher_bias (no gradient), or
    the top-k log-probs `topk_val` at `topk_idx` and -inf elsewhere. Arguments are already validated
    (and the default teacher head filled in) by linear_kl_div."""
    student = F.linear(masked_rows_zeroed(hidden, weights), weight, bias)
    if topk_idx is not None:
        teacher_logits = topk_dense(topk_idx, topk_val, weight.shape[0])
    elif teacher_logits is None:
        with torch.no_grad():
            teacher_logits = F.linear(masked_rows_zeroed(teacher_hidden, weights), teacher_weight, teacher_bias)
    return kl_div_reference(student, teacher_logits, weights, temperature, reduction)


def topk_dense(topk_idx, topk_val, n_vocab):
    """[R, V] teacher logits of a top-k cache: the cached values at their slots, -inf elsewhere."""
    dense = torch.full((topk_idx.shape[0], n_vocab), float("-inf"), dtype=topk_val.dtype, device=topk_val.device)
    return dense.scatter_(1, topk_idx, topk_val)

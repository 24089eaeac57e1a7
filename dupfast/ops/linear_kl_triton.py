"""Triton backend of dupfast.ops.linear_kl_div: the chunk loop of csrc/linear_kl_op.h in Python, with
torch GEMMs (cuBLAS on a GPU) for the logits and the gradient products and the kl_div Triton row kernel
(dupfast/ops/kl_triton.py: loss and gradient of each chunk of logits in one launch) for the softmax /
KL / gradient math. Run only under TRITON_INTERPRET=1 on small shapes; never on a GPU. Imported lazily.
"""
import torch

from . import kl_triton
from .linear_kl_reference import topk_dense


def _masked_zero(x, masked):
    return x if masked is None else x.masked_fill(masked.unsqueeze(1), 0)


def chunked(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_idx, topk_val,
            weights, inv_temperature, grad_scale, chunk_rows, grad_hidden, grad_weight, grad_bias, rows_fn=None, block=None):
    """Same contract as dupfast::linear_kl_div_fused. rows_fn(s, t, w, inv_t, scale) -> (loss, grad) is the
    per-chunk row kernel (default: kl_triton.launch, whose block size `block` overrides)."""
    if rows_fn is None:
        def rows_fn(s, t, w, inv_t, scale):
            return kl_triton.launch(s, t, w, inv_t, scale, block=block)
    rows, h = hidden.shape
    n_vocab = weight.shape[0]
    grad_bias = grad_bias and bias is not None
    loss = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    gh = torch.empty_like(hidden) if grad_hidden else hidden.new_empty((0,))
    gw_acc = torch.zeros(n_vocab, h, dtype=torch.float32, device=hidden.device) if grad_weight else None
    gb_acc = torch.zeros(n_vocab, dtype=torch.float32, device=hidden.device) if grad_bias else None
    masked = None if weights is None else weights == 0
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        m = None if masked is None or not bool(masked[r0:r1].any()) else masked[r0:r1]
        hc = _masked_zero(hidden[r0:r1], m)
        s = torch.nn.functional.linear(hc, weight, bias)
        if teacher_hidden is not None:
            t = torch.nn.functional.linear(_masked_zero(teacher_hidden[r0:r1], m), teacher_weight, teacher_bias)
        elif topk_idx is not None:
            t = topk_dense(topk_idx[r0:r1], topk_val[r0:r1], n_vocab)
        else:
            t = teacher_logits[r0:r1]
        w = None if weights is None else weights[r0:r1]
        loss[r0:r1], g = rows_fn(s, t, w, inv_temperature, grad_scale)
        if grad_hidden:
            torch.mm(g, weight, out=gh[r0:r1])
        if grad_weight:
            gw_acc += (g.t() @ hc).float()  # 16-bit products accumulated in float32, as in the C++ driver
        if grad_bias:
            gb_acc += g.sum(0, dtype=torch.float32)
    gw = gw_acc.to(weight.dtype) if grad_weight else weight.new_empty((0,))
    gb = gb_acc.to(bias.dtype) if grad_bias else weight.new_empty((0,))
    return loss, gh, gw, gb


@torch.library.custom_op("dupfast::linear_kl_div_fused_triton", mutates_args=())
def linear_kl_div_fused_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                               teacher_bias: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                               topk_idx: torch.Tensor | None, topk_val: torch.Tensor | None,
                               weights: torch.Tensor | None, inv_temperature: float, grad_scale: float,
                               chunk_rows: int, grad_hidden: bool, grad_weight: bool,
                               grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_loss [R] float32, grad_hidden, grad_weight, grad_bias); same contract as dupfast::linear_kl_div_fused
    (gradients not asked for are empty)."""
    return chunked(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_idx,
                   topk_val, weights, inv_temperature, grad_scale, chunk_rows, grad_hidden, grad_weight, grad_bias)


@linear_kl_div_fused_triton.register_fake
def _(*args):
    from .linear_kl import _fake
    return _fake(*args)

"""Fused LM head + signed-weight KL(p_T || p_S), in chunks of rows: the [R, V] student logits are never
materialised.

    linear_kl_div(hidden, weight, teacher_hidden=None, weights=None, *, teacher_weight=None,
                  teacher_bias=None, teacher_logits=None, teacher_topk=None, bias=None,
                  temperature=1.0, reduction="batchmean", chunk_rows=None, backend=None)

equals kl_div(hidden @ weight.T + bias, teacher, weights, temperature, reduction) (dupfast.ops.kl_div:
same signed row weights, w_r < 0 ascent, w_r = 0 masks the row entirely even if it holds inf/NaN; same
temperature; reductions none/sum/mean/batchmean; float32 loss), and so do its gradients: w.r.t.
`hidden` when it requires grad, w.r.t. `weight` / `bias` only when they require grad (a frozen head,
the LoRA case, costs no weight-gradient GEMM).

The teacher is given either
  * as cached hidden states `teacher_hidden` [R, H_T] with its head `teacher_weight` [V, H_T]
    (+ `teacher_bias`), or, when teacher_weight is None, the student's own head detached (weight and
    bias: the usual LoRA case, the head frozen); its logits are recomputed chunk by chunk, or
  * as cached `teacher_logits` [R, V] (logits or log-probabilities: softmax(t / T) is the same
    distribution either way, as in kl_div's teacher_log_probs), or
  * as a cached top-k teacher `teacher_topk` = (indices [R, k], log-probs [R, k]) (teacher_topk_cache
    makes one): the teacher is softmax(log-probs / T) over the k cached slots and 0 elsewhere, i.e.
    kl_div against teacher logits that are -inf outside them. It drops the tail's mass, so it is an
    approximation of the full teacher, exact only for k = V; it saves the teacher's GEMM but its
    -inf slots slow the row kernel (see csrc/linear_kl_op.h). Recommended: the exact recomputed
    teacher (teacher_hidden); benchmarks/bench_linear_kl.py measures the error and speed of both.
Exactly one of teacher_hidden, teacher_logits and teacher_topk is given.

Fused backends (cpu, cuda, triton), per chunk of `chunk_rows` rows (default: at most 2^25 logits
per chunk, 128 MiB in fp32; see default_chunk_rows): s = h @ W^T (+b) and the teacher's logits by
GEMM, then the kl_div_fused row kernel (loss and gradient g = w_r / T * scale * (p_S - p_T) in one
pass over the chunk), then grad_hidden = g @ W and grad_weight += g^T @ h. Peak extra memory is
O(chunk_rows * V) plus the gradients ([R, H], and [V, H] if the head is trainable), never O(R * V).
Full rows of V are kept per chunk (no vocabulary chunking): the gradient then needs each logit once,
so the fused op does the same GEMMs as PyTorch (3 with a frozen head, 4 with a trainable one, the
teacher's included) instead of recomputing the logits in a second pass over vocabulary chunks, and
chunk_rows * V is already small next to PyTorch's R * V (592 rows x 49,152 in fp32 = 111 MiB per
buffer at SmolLM2's head and R = 4096, against PyTorch's several 768 MiB [R, V] tensors).

The gradients are computed in the forward and held until backward (which scales them by
grad_output), except for reduction="none" with a trainable head or bias: there a per-row grad_output
cannot be applied after the sum over rows, so the forward computes only the loss and backward reruns
the chunks with the rows weighted by grad_output.

Backends: reference (F.linear + kl_div reference + autograd, [R, V] memory), cpu (C++: ATen GEMMs +
the OpenMP row kernel), cuda (the same C++ driver, cuBLAS GEMMs + the kl_div CUDA row kernel; never run
on a GPU and never built by a CUDA torch: its binding is only checked by g++ -fsyntax-only against
the host's c10/cuda and CUDA headers, and the row kernel's .cu is nvcc-compiled in CI), triton (a Python chunk driver, torch GEMMs + the kl_div Triton row kernel;
run only under TRITON_INTERPRET=1 on small shapes, never on a GPU).
"""
import os

import torch

from ._dispatch import register_op, resolve
from .kl import _check_device, _grad_scale, _triton_available, check_row_weights, check_temperature_and_reduction
from .kl_reference import reduce_rows
from .linear_kl_reference import linear_kl_div_reference

_OP = "linear_kl_div"
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_ELEMENTS = 1 << 25  # default bound on one chunk's logits: 128 MiB in fp32, 64 MiB in bf16


def default_chunk_rows(rows, n_vocab):
    """Rows per chunk: as many as keep one [rows, V] logits buffer within CHUNK_ELEMENTS (larger chunks
    run the head's GEMMs faster: measured 68 -> 85 GFLOP/s from 160 to 640 rows at H = 576,
    V = 49,152 in fp32 here), then balanced over the chunks that takes, in multiples of 16 rows where
    that stays within the bound, so that no small last chunk runs a slow GEMM."""
    most = max(1, CHUNK_ELEMENTS // max(1, n_vocab))
    if rows <= most:
        return rows
    n_chunks = -(-rows // most)
    per = -(-rows // n_chunks)
    if per > 16 and per % 16 and per + 16 - per % 16 <= most:
        per += 16 - per % 16
    return per


def linear_kl_div(hidden, weight, teacher_hidden=None, weights=None, *, teacher_weight=None, teacher_bias=None,
                  teacher_logits=None, teacher_topk=None, bias=None, temperature=1.0, reduction="batchmean",
                  chunk_rows=None, backend=None):
    """See the module docstring. hidden [R, H], weight [V, H], bias [V]; teacher: teacher_hidden [R, H_T]
    (+ teacher_weight [V, H_T], teacher_bias [V]), teacher_logits [R, V] or teacher_topk (indices [R, k],
    log-probs [R, k]); weights [R] or None."""
    teacher_weight, teacher_bias, topk_idx, topk_val, weights = _validate(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk, weights,
        temperature, reduction, chunk_rows)
    if hidden.dtype == torch.float64 and backend is None and not os.environ.get("DUPFAST_BACKEND"):
        name = "reference"  # only the reference computes in float64
    else:
        name, _ = resolve(_OP, hidden.device, backend)
    if name == "reference":
        return linear_kl_div_reference(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                       teacher_logits, topk_idx, topk_val, weights, temperature, reduction)
    teacher = next(x for x in (teacher_hidden, teacher_logits, topk_val) if x is not None)
    if hidden.dtype not in _FUSED_DTYPES or teacher.dtype not in _FUSED_DTYPES:
        raise TypeError(f"backend {name!r} supports float32/bfloat16/float16 inputs, got hidden {hidden.dtype}, "
                        f"teacher {teacher.dtype}; use backend='reference' for float64")
    _check_device(name, hidden.device)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], weight.shape[0])

    def c(x):
        return None if x is None else x.contiguous()

    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))):
        # no graph (torch.no_grad, evaluation): the loss alone, no gradient GEMM
        row_loss = _FUSED[name](hidden.contiguous(), weight.contiguous(), c(bias), c(teacher_hidden),
                                c(teacher_weight), c(teacher_bias), c(teacher_logits), c(topk_idx), c(topk_val), weights,
                                1.0 / float(temperature), 1.0, int(chunk_rows), False, False, False)[0]
        return reduce_rows(row_loss, reduction, weight.shape[0])
    return _LinearKLDiv.apply(hidden.contiguous(), weight.contiguous(), c(bias), c(teacher_hidden),
                              c(teacher_weight), c(teacher_bias), c(teacher_logits), c(topk_idx), c(topk_val), weights,
                              1.0 / float(temperature), reduction, int(chunk_rows), name)


def _shape(x):
    return tuple(x.shape)


def _validate(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
              weights, temperature, reduction, chunk_rows):
    """Check the arguments; return (teacher_weight, teacher_bias, topk indices, topk values, weights) with
    the teacher head filled in (the student's head detached when teacher_weight is None), the top-k
    indices as int64 and weights as float32 (or None)."""
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    for name, x in (("bias", bias), ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias), ("teacher_logits", teacher_logits), ("weights", weights)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(x).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [R, H], got shape {_shape(hidden)} "
                         "(flatten leading dims with .flatten(0, -2))")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {_shape(weight)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden [R, H] = {_shape(hidden)} and weight [V, H] = {_shape(weight)} disagree on H")
    rows, n_vocab = hidden.shape[0], weight.shape[0]
    if rows == 0:
        raise ValueError(f"hidden must have at least one row, got shape {_shape(hidden)}")
    if n_vocab == 0 or hidden.shape[1] == 0:
        raise ValueError(f"need V >= 1 and H >= 1, got hidden {_shape(hidden)}, weight {_shape(weight)}")
    if not hidden.dtype.is_floating_point or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share a floating-point dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    _check_vector("bias", bias, weight)

    if sum(x is not None for x in (teacher_hidden, teacher_logits, teacher_topk)) != 1:
        raise ValueError("give the teacher as teacher_hidden (cached hidden states, [R, H]), teacher_logits "
                         "([R, V]) or teacher_topk ((indices, log-probs), [R, k] each), exactly one of them")
    topk_idx = topk_val = None
    if teacher_topk is not None:
        topk_idx, topk_val = _check_topk(teacher_topk, rows, n_vocab, hidden, weight)
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight / teacher_bias go with teacher_hidden; teacher_topk needs no head")
    elif teacher_logits is not None:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight / teacher_bias go with teacher_hidden; teacher_logits need no head")
        if teacher_logits.dim() != 2 or teacher_logits.shape[0] != rows:
            raise ValueError(f"teacher_logits must be [R, V] with R = {rows} (hidden {_shape(hidden)}), got "
                             f"{_shape(teacher_logits)}")
        if teacher_logits.shape[1] != n_vocab:
            raise ValueError(f"vocabulary mismatch: teacher_logits {_shape(teacher_logits)} has V = "
                             f"{teacher_logits.shape[1]}, weight {_shape(weight)} has V = {n_vocab}")
        _check_teacher_tensor("teacher_logits", teacher_logits, hidden)
    else:
        if teacher_weight is None:
            if teacher_bias is not None:
                raise ValueError("teacher_bias given without teacher_weight (the default teacher head is the "
                                 "student's weight and bias, detached)")
            teacher_weight = weight.detach()
            teacher_bias = None if bias is None else bias.detach()
        else:
            if not isinstance(teacher_weight, torch.Tensor) or teacher_weight.dim() != 2:
                raise ValueError(f"teacher_weight must be 2-D [V, H_T], got {_shape(teacher_weight)}")
            if teacher_weight.shape[0] != n_vocab:
                raise ValueError(f"vocabulary mismatch: teacher_weight {_shape(teacher_weight)} has V = "
                                 f"{teacher_weight.shape[0]}, weight {_shape(weight)} has V = {n_vocab}")
            _check_teacher_tensor("teacher_weight", teacher_weight, hidden)
            _check_vector("teacher_bias", teacher_bias, teacher_weight)
            if teacher_bias is not None:
                _check_teacher_tensor("teacher_bias", teacher_bias, hidden)
        if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != rows:
            raise ValueError(f"teacher_hidden must be [R, H_T] with R = {rows} (hidden {_shape(hidden)}), got "
                             f"{_shape(teacher_hidden)}")
        if teacher_hidden.shape[1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_hidden {_shape(teacher_hidden)} and its head {_shape(teacher_weight)} "
                             "disagree on H")
        _check_teacher_tensor("teacher_hidden", teacher_hidden, hidden)
        if teacher_hidden.dtype != teacher_weight.dtype:
            raise TypeError(f"teacher_hidden ({teacher_hidden.dtype}) and its head ({teacher_weight.dtype}) must "
                            "share a dtype")

    check_temperature_and_reduction(temperature, reduction)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    weights = check_row_weights(weights, rows, hidden.device, "hidden")
    return teacher_weight, teacher_bias, topk_idx, topk_val, weights


def _check_topk(teacher_topk, rows, n_vocab, hidden, weight):
    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2
            and all(isinstance(x, torch.Tensor) for x in teacher_topk)):
        raise TypeError("teacher_topk must be a pair of tensors (indices [R, k], log-probs [R, k]), as "
                        "teacher_topk_cache returns")
    idx, val = teacher_topk
    if idx.dim() != 2 or idx.shape != val.shape or idx.shape[0] != rows or idx.shape[1] == 0:
        raise ValueError(f"teacher_topk indices and log-probs must both be [R, k] with R = {rows} and k >= 1, got "
                         f"{_shape(idx)} and {_shape(val)}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"teacher_topk indices must be integers, got {idx.dtype}")
    _check_teacher_tensor("teacher_topk log-probs", val, hidden)
    if idx.device != hidden.device:
        raise ValueError(f"teacher_topk indices are on {idx.device}, hidden on {hidden.device}")
    if idx.device.type != "meta":
        lo, hi = int(idx.min()), int(idx.max())
        if hi >= n_vocab or lo < 0:
            raise ValueError(f"vocabulary mismatch: teacher_topk indices span [{lo}, {hi}], weight {_shape(weight)} "
                             f"has V = {n_vocab}")
        if idx.shape[1] > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("teacher_topk indices repeat a vocabulary slot within a row")
    return idx.to(torch.int64).contiguous(), val


def teacher_topk_cache(teacher_logits, k):
    """The top-k teacher cache of [R, V] teacher logits: (indices [R, k] int64, log-probs [R, k] float32).
    linear_kl_div(..., teacher_topk=cache) then uses the teacher softmax(log-probs / T) over the k cached
    slots (renormalised; the tail's mass is dropped), i.e. kl_div against logits that are -inf outside
    them."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    val, idx = log_p.topk(min(int(k), teacher_logits.shape[-1]), dim=-1)
    return idx, val


def _check_vector(name, b, head):
    if b is None:
        return
    if b.shape != head.shape[:1]:
        raise ValueError(f"{name} must be [V] = [{head.shape[0]}] (its head {_shape(head)}), got {_shape(b)}")
    if b.dtype != head.dtype:
        raise TypeError(f"{name} ({b.dtype}) must have its head's dtype ({head.dtype})")
    if b.device != head.device:
        raise ValueError(f"{name} is on {b.device}, its head on {head.device}")


def _check_teacher_tensor(name, x, hidden):
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.device != hidden.device:
        raise ValueError(f"{name} is on {x.device}, hidden on {hidden.device}")
    if x.requires_grad:
        raise ValueError(f"{name} must not require grad (the teacher is a fixed target); pass {name}.detach()")


# ---- fused backends --------------------------------------------------------------------------------

def _fused_compiled(*args):
    # One op for the C++ CPU driver and the CUDA one: the dispatcher routes by device. The arguments are
    # _fake's.
    return torch.ops.dupfast.linear_kl_div_fused(*args)


def _fused_triton(*args):
    from . import linear_kl_triton
    return linear_kl_triton.linear_kl_div_fused_triton(*args)


_FUSED = {"cpu": _fused_compiled, "cuda": _fused_compiled, "triton": _fused_triton}


class _LinearKLDiv(torch.autograd.Function):
    """Forward runs the chunked op (loss and the asked-for gradients together) and keeps the gradients;
    backward scales them by grad_output. reduction="none" with a trainable head: see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_idx,
                topk_val, weights, inv_temperature, reduction, chunk_rows, backend):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        rows, n_vocab = hidden.shape[0], weight.shape[0]
        ctx.deferred = reduction == "none" and (need_w or need_b)
        ctx.reduction, ctx.flags, ctx.backend = reduction, (need_h, need_w, need_b), backend
        ctx.inv_temperature, ctx.chunk_rows = inv_temperature, chunk_rows
        scale = _grad_scale(reduction, rows, n_vocab)
        fused = _FUSED[backend]
        if ctx.deferred:
            row_loss = fused(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                             topk_idx, topk_val, weights, inv_temperature, scale, chunk_rows, False, False, False)[0]
            ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                                  topk_idx, topk_val, weights)
        else:
            row_loss, gh, gw, gb = fused(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                         teacher_logits, topk_idx, topk_val, weights, inv_temperature, scale, chunk_rows, need_h, need_w,
                                         need_b)
            ctx.save_for_backward(gh if need_h else None, gw if need_w else None, gb if need_b else None)
        return reduce_rows(row_loss, reduction, n_vocab)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        need_h, need_w, need_b = ctx.flags
        none = (None,) * 11
        if ctx.deferred:
            # reduction="none": the rows weighted by grad_output (scale 1) give the gradients directly.
            *inputs, weights = ctx.saved_tensors
            w = grad_output.to(torch.float32) if weights is None else weights * grad_output.to(torch.float32)
            _, gh, gw, gb = _FUSED[ctx.backend](*inputs, w.contiguous(),
                                                ctx.inv_temperature, 1.0, ctx.chunk_rows, need_h, need_w, need_b)
            return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + none
        gh, gw, gb = ctx.saved_tensors
        if ctx.reduction == "none":  # only grad_hidden here: scaled per row
            return (_scaled(gh, grad_output.unsqueeze(1)), None, None) + none
        if not torch.compiler.is_compiling() and grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return (gh, gw, gb) + none  # loss.backward(): the stored gradients as they are
        return (_scaled(gh, grad_output), _scaled(gw, grad_output), _scaled(gb, grad_output)) + none


def _scaled(g, scale):
    if g is None:
        return None
    if g.dtype == torch.float32:
        return g * scale
    return (g.float() * scale).to(g.dtype)  # 16-bit: scale in float32 so grad_output is not rounded first


def _fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_idx, topk_val,
          weights, inv_temperature, grad_scale, chunk_rows, grad_hidden, grad_weight, grad_bias):
    empty = hidden.new_empty((0,))
    return (hidden.new_empty(hidden.shape[:1], dtype=torch.float32),
            torch.empty_like(hidden) if grad_hidden else empty,
            torch.empty_like(weight) if grad_weight else weight.new_empty((0,)),
            torch.empty_like(bias) if grad_bias and bias is not None else weight.new_empty((0,)))


register_op(_OP, _fake, reference=linear_kl_div_reference, cpu=_fused_compiled, cuda=_fused_compiled,
            triton=_fused_triton, triton_available=_triton_available, native="linear_kl_div_fused")

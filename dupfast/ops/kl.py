"""Fused KL(p_T || p_S) + gradient w.r.t. the student logits, with signed per-row weights.

    kl_div(student, teacher, weights=None, temperature=1.0, reduction="batchmean",
           teacher_log_probs=False, backend=None)

Per row r:  p_T = softmax(t_r / T),  p_S = softmax(s_r / T),  loss_r = w_r * KL(p_T || p_S).
Reductions follow torch.nn.KLDivLoss: "none" -> [R], "sum", "mean" = sum / (R * V),
"batchmean" = sum / R. The loss is float32 (float64 only on the reference backend).

Weights are signed: w_r < 0 is gradient ascent on that row (the unlearning term), w_r = 0 masks it
(zero loss and zero gradient, even if the row holds inf/NaN). Weights are constants: no gradient
flows to them (or to the teacher, which must not require grad).

teacher_log_probs=True says `teacher` holds log-probabilities (a cached teacher). They are
re-normalised: p_T = softmax(t / T), i.e. p_T ∝ p^(1/T). Softmax is shift-invariant, so this is
exactly the distribution that the logits the log-probs came from give at temperature T (for T = 1,
exp(t) up to rounding), and rounded bf16 log-probs still define a proper distribution. Both inputs
therefore go through the same math; the flag records what the tensor holds.

The fused backends (cpu, cuda, triton) compute the loss and the gradient
w_r * (p_S - p_T) / T * scale in the same pass and store the gradient (in the student's dtype);
backward only multiplies it by grad_output. -inf logits mark masked vocabulary slots: a slot with
p_T = 0 contributes nothing; a slot with p_S = 0 < p_T makes the loss +inf (the gradient stays finite).
A row whose logits are all -inf is not a distribution; its result is NaN.
"""
import os

import torch

from ._dispatch import register_op, resolve
from .kl_reference import kl_div_reference, reduce_rows

_OP = "kl_div"
_REDUCTIONS = ("none", "sum", "mean", "batchmean")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kl_div(student, teacher, weights=None, temperature=1.0, reduction="batchmean", teacher_log_probs=False,
           backend=None):
    """See the module docstring. student, teacher: [R, V]; weights: [R] or None (all ones)."""
    weights = _validate(student, teacher, weights, temperature, reduction, teacher_log_probs)
    if student.dtype == torch.float64 and backend is None and not os.environ.get("DUPFAST_BACKEND"):
        name = "reference"  # only the reference computes in float64
    else:
        name, _ = resolve(_OP, student.device, backend)
    if name == "reference":
        return kl_div_reference(student, teacher, weights, temperature, reduction, teacher_log_probs)
    if student.dtype not in _FUSED_DTYPES or teacher.dtype not in _FUSED_DTYPES:
        raise TypeError(f"backend {name!r} supports float32/bfloat16/float16 inputs, got student {student.dtype}, "
                        f"teacher {teacher.dtype}; use backend='reference' for float64")
    _check_device(name, student.device)
    return _FusedKLDiv.apply(student.contiguous(), teacher.contiguous(), weights, 1.0 / float(temperature),
                             reduction, name)


def _validate(student, teacher, weights, temperature, reduction, teacher_log_probs):
    """Check the arguments; return the weights as contiguous float32 (or None)."""
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError(f"student and teacher must be tensors, got {type(student).__name__} and "
                        f"{type(teacher).__name__}")
    if student.dim() != 2:
        raise ValueError(f"student must be 2-D [R, V], got shape {tuple(student.shape)} "
                         "(flatten leading dims with .flatten(0, -2))")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} != student shape {tuple(student.shape)}")
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(f"student must have at least one row and one vocabulary slot, got {tuple(student.shape)}")
    if not student.dtype.is_floating_point or not teacher.dtype.is_floating_point:
        raise TypeError(f"student and teacher must be floating point, got {student.dtype} and {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device}, student on {student.device}")
    if teacher.requires_grad:
        raise ValueError("teacher must not require grad (it is a fixed target); pass teacher.detach()")
    check_temperature_and_reduction(temperature, reduction)
    if not isinstance(teacher_log_probs, bool):
        raise TypeError(f"teacher_log_probs must be a bool, got {type(teacher_log_probs).__name__}")
    return check_row_weights(weights, student.shape[0], student.device, "student")


def check_temperature_and_reduction(temperature, reduction):
    """The KL ops' shared scalars: a finite temperature > 0 and one of the KLDivLoss reductions."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_row_weights(weights, rows, device, against):
    """The signed per-row weights of a KL op: None, or a constant floating [rows] tensor on `device`
    (`against` names the tensor it must match); returned as contiguous float32."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor or None, got {type(weights).__name__}")
    if tuple(weights.shape) != (rows,):
        raise ValueError(f"weights must have shape [R] = [{rows}], got {tuple(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weights are on {weights.device}, {against} on {device}")
    if weights.requires_grad:
        raise ValueError("weights must not require grad (they are per-row constants); pass weights.detach()")
    return weights.to(torch.float32).contiguous()


def _check_device(name, device):
    if device.type == "meta":
        return
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _grad_scale(reduction, rows, n_vocab):
    return {"none": 1.0, "sum": 1.0, "mean": 1.0 / (rows * n_vocab), "batchmean": 1.0 / rows}[reduction]


def _fused_compiled(student, teacher, weights, inv_temperature, grad_scale):
    # One op for the C++ CPU kernel and the CUDA kernel: the dispatcher routes by device.
    return torch.ops.dupfast.kl_div_fused(student, teacher, weights, inv_temperature, grad_scale)


def _fused_triton(student, teacher, weights, inv_temperature, grad_scale):
    from . import kl_triton
    return kl_triton.kl_div_fused_triton(student, teacher, weights, inv_temperature, grad_scale)


_FUSED = {"cpu": _fused_compiled, "cuda": _fused_compiled, "triton": _fused_triton}


class _FusedKLDiv(torch.autograd.Function):
    """Forward runs the fused kernel (loss and gradient together) and keeps the gradient;
    backward only scales it by grad_output (per row for reduction="none")."""

    @staticmethod
    def forward(ctx, student, teacher, weights, inv_temperature, reduction, backend):
        rows, n_vocab = student.shape
        row_loss, grad = _FUSED[backend](student, teacher, weights, inv_temperature,
                                         _grad_scale(reduction, rows, n_vocab))
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return reduce_rows(row_loss, reduction, n_vocab)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_output.unsqueeze(1)
        else:
            # The common case (loss.backward() on a scalar): hand the stored gradient over as is. Once
            # the graph is freed autograd takes it without a copy.
            if not torch.compiler.is_compiling() and grad_output.device.type == "cpu" and grad_output.item() == 1.0:
                return grad, None, None, None, None, None
            scale = grad_output
        if grad.dtype == torch.float32:
            return grad * scale, None, None, None, None, None
        # 16-bit gradient: scale in float32 so grad_output is not rounded to 16 bits first.
        return (grad.float() * scale).to(grad.dtype), None, None, None, None, None


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _fake(student, teacher, weights, inv_temperature, grad_scale):
    return student.new_empty(student.shape[:1], dtype=torch.float32), torch.empty_like(student)


register_op(_OP, _fake, reference=kl_div_reference, cpu=_fused_compiled, cuda=_fused_compiled,
            triton=_fused_triton, triton_available=_triton_available, native="kl_div_fused")

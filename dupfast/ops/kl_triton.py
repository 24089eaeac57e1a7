"""Triton kernel of the fused KL(p_T || p_S) + gradient (the GPU fallback where the CUDA C++ op is
not built). One program per row; two passes over V in blocks: pass 1 keeps a per-lane online
max / sum-exp for both rows, pass 2 writes the loss terms and the gradient. Same math as
csrc/kl_math.h. Imported lazily: `import dupfast.ops` works without triton.
"""
import torch
import triton
import triton.language as tl

_MAX_BLOCK = 4096


@triton.jit
def _row_norm(ptr, V, inv_t, BLOCK: tl.constexpr):
    """(m, log s) of one row of y = x * inv_t: m = max y, s = sum exp(y - m), so that
    log p = (y - m) - log s; -inf slots (masked vocabulary) are skipped."""
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        x = tl.load(ptr + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, x)
        live = m_new != float("-inf")  # a lane that has seen only -inf keeps d = 0 (avoids -inf - -inf)
        m_safe = tl.where(live, m_new, 0.0)
        d = tl.where(live, d * tl.exp(m - m_safe) + tl.exp(x - m_safe), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    d_row = tl.sum(tl.where(m != float("-inf"), d * tl.exp(m - m_row), 0.0), axis=0)
    return m_row, tl.log(d_row)


@triton.jit
def _to_grad_dtype(x, g_ptr, GRAD_BF16: tl.constexpr):
    """float32 -> gradient dtype, bf16 rounded to nearest even by hand: the interpreter's cast
    truncates (3x the error of PyTorch's bf16 gradient in the tests); the GPU cast rounds."""
    if GRAD_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(g_ptr.dtype.element_ty)


@triton.jit
def _kl_rows_kernel(s_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, V, inv_t, grad_scale,
                    HAS_WEIGHTS: tl.constexpr, GRAD_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = g_ptr + row * V
    cols = tl.arange(0, BLOCK)
    w = 1.0
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + row)
    if w == 0.0:  # masked row: zero loss and gradient, inputs never read
        for off in range(0, V, BLOCK):
            tl.store(g_row + off + cols, tl.zeros([BLOCK], tl.float32).to(g_ptr.dtype.element_ty),
                     mask=off + cols < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        m_s, log_s_s = _row_norm(s_row, V, inv_t, BLOCK)
        m_t, log_s_t = _row_norm(t_row, V, inv_t, BLOCK)
        dnorm = (m_s - m_t) + (log_s_s - log_s_t)  # lse_s - lse_t, as in kl_math.h
        coef = w * inv_t * grad_scale
        acc = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            ys = tl.load(s_row + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            yt = tl.load(t_row + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            ps = tl.exp((ys - m_s) - log_s_s)
            pt = tl.exp((yt - m_t) - log_s_t)
            tl.store(g_row + off + cols, _to_grad_dtype(coef * (ps - pt), g_ptr, GRAD_BF16),
                     mask=mask)
            # p_T == 0 adds 0, even where the student slot is -inf too; masked lanes add 0.
            # log p_T - log p_S from the differences: exactly 0 for a tie (as in kl_math.h).
            acc += tl.where(mask & (pt > 0.0), pt * ((yt - ys) + dnorm), 0.0)
        tl.store(loss_ptr + row, w * tl.sum(acc, axis=0))


def _block_for(n_vocab):
    return min(triton.next_power_of_2(n_vocab), _MAX_BLOCK)


@torch.library.custom_op("dupfast::kl_div_fused_triton", mutates_args=())
def kl_div_fused_triton(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None,
                        inv_temperature: float, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_loss [R] float32, grad [R, V] in the student's dtype); same contract as dupfast::kl_div_fused."""
    return launch(student, teacher, weights, inv_temperature, grad_scale)


@kl_div_fused_triton.register_fake
def _(student, teacher, weights, inv_temperature, grad_scale):
    return student.new_empty(student.shape[:1], dtype=torch.float32), torch.empty_like(student)


def launch(student, teacher, weights, inv_temperature, grad_scale, block=None):
    """Launch the kernel; `block` overrides the block size (tests use it to force several blocks)."""
    rows, n_vocab = student.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student)
    if rows == 0:
        return loss, grad
    block = block or _block_for(n_vocab)
    _kl_rows_kernel[(rows,)](
        student, teacher, weights if weights is not None else loss, loss, grad, n_vocab,
        float(inv_temperature), float(grad_scale), HAS_WEIGHTS=weights is not None,
        GRAD_BF16=student.dtype == torch.bfloat16, BLOCK=block,
        num_warps=4 if block <= 1024 else 8)
    return loss, grad

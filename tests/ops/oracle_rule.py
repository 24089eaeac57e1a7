"""The rule every kernel test holds a backend to, and the fp64 KL oracle the KL tests share.

Oracle: an fp64 formula written in the tests (numpy or float64 torch, straight from the definition), never
the code under test: dupfast's pure-PyTorch references are backends like the others and are held to it too.

Rule, for an output `got` (a kernel, or the reference backend) on the same inputs as the oracle `exact`:

    |got - exact| <= min(k * max|base - exact| + eps, bound)      (elementwise)
    |base - exact| <= bound

base: plain PyTorch with fp32 accumulation on the same inputs (16-bit inputs upcast, as the ops promise; a
16-bit output rounded like the op's). bound: an absolute fp32-accumulation error bound derived per op from the
shapes and magnitudes (C * eps32 times the problem's own terms, plus the rounding of a 16-bit output where the
op returns one). An fp32-accumulating kernel meets it; one that accumulates or rounds its intermediates in bf16
(2^-8 against 2^-23) does not, whatever PyTorch's error, and a baseline that is itself far from the oracle fails
instead of loosening the rule. The relative part keeps a kernel as good as PyTorch where the bound is loose.
"""
import math

import numpy as np
import torch

EPS32 = torch.finfo(torch.float32).eps


def _np64(x):
    return (x.detach().to("cpu", torch.float64) if isinstance(x, torch.Tensor)
            else torch.as_tensor(x, dtype=torch.float64)).numpy()


def mm(a, b):
    """a @ b; on the CPU in numpy: torch's 2-thread fp64 GEMMs spin-wait on a busy 2-core machine (a
    300 x 130 x 130 product measured 16 ms against numpy's 0.5 ms)."""
    if a.device.type != "cpu":
        return a @ b
    return torch.from_numpy(a.numpy() @ b.numpy())


def assert_rule(got, exact, base, bound, what, eps=0.0, k=2.0):
    """The rule above; bound is a float or a tensor broadcastable to exact. Non-finite oracle entries must be
    matched exactly (same inf, NaN where NaN) by got and base. (numpy: see mm.)"""
    got, exact, base = _np64(got), _np64(exact), _np64(base)
    bound = np.broadcast_to(_np64(bound), exact.shape)
    assert got.shape == exact.shape == base.shape, f"{what}: shapes {got.shape}, {exact.shape}, {base.shape}"
    finite = np.isfinite(exact)
    for name, x in (("result", got), ("PyTorch baseline", base)):
        same = np.array_equal(x[~finite], exact[~finite], equal_nan=True)
        assert same and np.isfinite(x[finite]).all(), f"{what}: {name} non-finite where the oracle is not"
    if not finite.any():
        return
    got, exact, base, bound = got[finite], exact[finite], base[finite], bound[finite]
    base_err, err = np.abs(base - exact), np.abs(got - exact)
    worst = (base_err - bound).argmax()
    # the baseline first: a rule relative to a baseline that is itself off would pass anything
    assert (base_err <= bound).all(), (f"{what}: PyTorch baseline error {base_err[worst]:.3g} > fp32 bound "
                                       f"{bound[worst]:.3g} (oracle {exact[worst]:.6g})")
    rel = k * base_err.max() + eps
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: error {err[worst]:.3g} > fp32 bound {bound[worst]:.3g} "
                                  f"(oracle {exact[worst]:.6g}, got {got[worst]:.6g})")
    assert err.max() <= rel, (f"{what}: error {err.max():.3g} > {k:g} x PyTorch error {base_err.max():.3g} "
                              f"+ {eps:.3g}")


# ---- KL(p_T || p_S): the oracle of test_kl.py and test_linear_kl.py ----------------------------------------

SCALES = {"none": lambda r, v: 1.0, "sum": lambda r, v: 1.0, "mean": lambda r, v: 1.0 / (r * v),
          "batchmean": lambda r, v: 1.0 / r}


def _log_softmax64(y):
    """Explicit log-softmax: y - (m + log sum exp(y - m)), m the row max (a constant: exact gradient)."""
    m = y.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    return y - (m + (y - m).exp().sum(-1, keepdim=True).log())


def kl_rows64(s, t, w, temperature):
    """fp64 w_r * sum_j p_T (log p_T - log p_S) per row (s differentiable), and p_S, p_T. Rows with w = 0 are
    zeroed first (the ops' masking); slots with p_T = 0 contribute 0 (and no NaN gradient)."""
    dev = s.device
    keep = torch.ones(s.shape[0], dtype=torch.bool, device=dev) if w is None else (w != 0).to(dev)
    y = torch.where(keep[:, None], s, 0.0) / temperature
    z = torch.where(keep[:, None], t.detach().to(dev, torch.float64), 0.0) / temperature
    log_ps, log_pt = _log_softmax64(y), _log_softmax64(z)
    p_t = log_pt.exp()
    on = p_t > 0
    rows = (p_t * (torch.where(on, log_pt, 0.0) - torch.where(on, log_ps, 0.0))).sum(-1)
    if w is not None:
        rows = rows * w.to(dev, torch.float64)
    return rows, log_ps.detach().exp(), p_t


def reduce64(rows, reduction, vocab):
    return rows if reduction == "none" else rows.sum() * SCALES[reduction](rows.shape[0], vocab)


def kl_oracle(s, t, w, temperature, reduction, grad_output=None):
    """(loss, d loss/d s . grad_output, p_S, p_T, weighted row KLs) in fp64 on s's device: the formula above
    and torch.autograd."""
    x = s.detach().double().requires_grad_()
    rows, p_s, p_t = kl_rows64(x, t, w, temperature)
    loss = reduce64(rows, reduction, s.shape[1])
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(x.device, torch.float64)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), grad, p_s, p_t, rows.detach()


def kl_bounds(unit, w, reduction, rows_exact, p_s, p_t, grad_exact, grad_output, temperature, out_dtype,
              c_loss=16.0, c_grad=16.0):
    """fp32-accumulation bounds of (loss, grad w.r.t. the logits). unit (a float, or [R] per row) bounds the
    error of a log-probability: ~eps32 (1 + |y|max + log V) for logits computed in fp32 (y = x / T; see
    kl_unit). Weighted by p_T that bounds a row's KL; relative to p it bounds each gradient entry
    |w_r| / T * scale * (p_S - p_T). A 16-bit gradient adds its own rounding, u16 |g| + the subnormal step;
    the reduction adds eps32 * R of the summed rows."""
    rows, vocab = p_s.shape
    dev = p_s.device
    unit = torch.as_tensor(unit, dtype=torch.float64, device=dev).expand(rows)
    scale = SCALES[reduction](rows, vocab)
    w_abs = torch.ones(rows, dtype=torch.float64, device=dev) if w is None else w.to(dev, torch.float64).abs()
    go = (torch.ones((), dtype=torch.float64, device=dev) if grad_output is None
          else grad_output.to(dev, torch.float64).abs())
    go_rows = go if reduction == "none" else go.expand(rows)
    row_loss = c_loss * unit * w_abs + EPS32 * rows_exact.abs()
    if reduction == "none":
        loss_bound = row_loss
    else:
        loss_bound = scale * (row_loss.sum() + EPS32 * rows * rows_exact.abs().sum())
    coef = (w_abs * scale * go_rows / temperature)[:, None]
    fi = torch.finfo(out_dtype)
    u_out = fi.eps / 2 if out_dtype != torch.float32 else EPS32
    # the kernels clamp exp's argument near -87 (glibc's vector expf): p below ~e^-87 is not resolved; and
    # they flush gradient entries below the smallest normal float to 0
    tiny = torch.finfo(torch.float32).tiny
    floor = coef * 4 * tiny + tiny + fi.smallest_normal * fi.eps
    grad_bound = c_grad * unit[:, None] * coef * (p_s + p_t) + u_out * grad_exact.abs() + floor
    return loss_bound, grad_bound


def kl_unit(y_max, vocab):
    """Error of an fp32 log-probability of logits y (|y| <= y_max): the log-sum-exp and y - lse."""
    return EPS32 * (1 + y_max + math.log(vocab))

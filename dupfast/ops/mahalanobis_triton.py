"""Triton multi-layer Mahalanobis: one program per (row block, selected layer).

Each program centres its rows on the fly (x - mu0, bf16 upcast to fp32 before tl.dot), multiplies by
W one [BLOCK_N] column tile at a time with tl.dot (input_precision="ieee": no TF32), and reduces every
tile straight into q_k = ||Y - S_k||^2 for all K means (S_k = (mu_k - mu0) W, prepared once per call),
so only a [BLOCK_M, BLOCK_N] tile of Y ever exists. For a lower-triangular W the K loop of column
tile j0 starts at row j0. Tested under TRITON_INTERPRET=1 on CPU tensors; not run on a GPU here.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None
    tl = None


def available():
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _mahalanobis_kernel(x_ptr, s_n, s_l, w_ptr, mu0_ptr, shift_ptr, lower_ptr, layers_ptr, out_ptr,
                            N, D, K, NSEL,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            KP: tl.constexpr, SQUARED: tl.constexpr, REDUCE_MIN: tl.constexpr):
        pid_m = tl.program_id(0)
        lsel = tl.program_id(1)
        layer = tl.load(layers_ptr + lsel).to(tl.int64)
        lower = tl.load(lower_ptr + lsel)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        x_rows = x_ptr + rows.to(tl.int64) * s_n + layer * s_l
        w_base = w_ptr + layer * D * D
        kidx = tl.arange(0, KP)
        q = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
        for j0 in range(0, D, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < D
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            k_start = tl.where(lower != 0, (j0 // BLOCK_K) * BLOCK_K, 0)
            for k0 in range(k_start, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < D
                xv = tl.load(x_rows[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                mu0 = tl.load(mu0_ptr + lsel * D + ks, mask=kmask, other=0.0)
                xc = tl.where(kmask[None, :], xv.to(tl.float32) - mu0[None, :], 0.0)
                wv = tl.load(w_base + ks[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                             other=0.0)
                acc += tl.dot(xc, wv, input_precision="ieee")
            for k in range(0, K):
                sk = tl.load(shift_ptr + (lsel * K + k) * D + cols, mask=cmask, other=0.0)
                diff = tl.where(cmask[None, :], acc - sk[None, :], 0.0)
                part = tl.sum(diff * diff, axis=1)
                q += tl.where(kidx[None, :] == k, part[:, None], 0.0)
        # finalize: clamp tiny negatives (NaN stays NaN), sqrt, min over K with NaN propagation
        val = tl.where(q < 0.0, 0.0, q)
        if not SQUARED:
            val = tl.sqrt(val)
        kvalid = kidx[None, :] < K
        if REDUCE_MIN:
            has_nan = tl.sum(tl.where(kvalid & (val != val), 1, 0), axis=1) > 0
            best = tl.min(tl.where(kvalid, val, float("inf")), axis=1)
            best = tl.where(has_nan, float("nan"), best)
            tl.store(out_ptr + rows.to(tl.int64) * NSEL + lsel, best, mask=rmask)
        else:
            offs = (rows.to(tl.int64)[:, None] * NSEL + lsel) * K + kidx[None, :]
            tl.store(out_ptr + offs, val, mask=rmask[:, None] & kvalid)


def prepare(means, whiteners, layers):
    """Per selected layer: centroid mu0 [L', d], whitened shifts S [L', K, d] (fp64 products, stored
    fp32) and whether W is lower triangular [L'] (int32). Shared by the triton and reference tests."""
    sel = torch.as_tensor(layers, dtype=torch.long, device=means.device)
    mu = means.index_select(0, sel).double()
    W = whiteners.index_select(0, sel)
    mu0 = mu.mean(dim=1)
    shift = torch.matmul(mu - mu0[:, None, :], W.double())
    lower = (torch.triu(W, diagonal=1) == 0).flatten(1).all(dim=1).to(torch.int32)
    return mu0.float().contiguous(), shift.float().contiguous(), lower, sel


def mahalanobis_triton(features, means, whiteners, layers, reduce, squared,
                       block_m=32, block_n=64, block_k=32):
    if triton is None:
        raise RuntimeError("mahalanobis[triton]: triton is not installed")
    x = features if features.stride(2) == 1 else features.contiguous()
    n, _, d = x.shape
    k = means.shape[1]
    w = whiteners.contiguous()
    mu0, shift, lower, sel = prepare(means, w, layers)
    nsel = len(layers)
    reduce_min = reduce == "min"
    out = torch.empty((n, nsel) if reduce_min else (n, nsel, k), device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    grid = (triton.cdiv(n, block_m), nsel)
    _mahalanobis_kernel[grid](x, x.stride(0), x.stride(1), w, mu0, shift, lower, sel, out,
                              n, d, k, nsel,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              KP=max(triton.next_power_of_2(k), 2), SQUARED=squared, REDUCE_MIN=reduce_min)
    return out

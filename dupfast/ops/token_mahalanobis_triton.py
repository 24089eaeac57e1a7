"""Triton token-level Mahalanobis: two kernels per call.

1. `_token_dist_kernel`, one launch per selected layer (the layers are separate tensors), one program per
   BLOCK_M valid tokens: the valid tokens are listed first (flat ids b * T + t of mask != 0, so pads are
   never loaded or multiplied); the program gathers its tokens' rows, centres them on their row's mean
   (means[l, classes[b]], bf16 upcast to fp32 before tl.dot), multiplies by W one [BLOCK_N] column tile at a
   time with tl.dot (input_precision="ieee": no TF32; a lower-triangular W starts the K loop at the tile's
   row), folds each tile into the tokens' squared norms and stores the distances in an [L', B * T] fp32 buffer.
   Only a [BLOCK_M, BLOCK_N] tile of whitened tokens ever exists.
2. `_token_reduce_kernel`, one program per (row, selected layer): loads the row's distances and mask
   (BLOCK_T = next power of 2 >= T) and picks its best token KEFF = min(topk, T) times: NaN first, then the
   largest value, the lowest index among equals (the order of csrc/token_mahalanobis_math.h); the first pick
   is the argmax, the picked values' mean the score; a row without valid tokens gives (0, -1).

Tested under TRITON_INTERPRET=1 on CPU tensors (and compiled for sm_80/sm_90 by the tests); not run on a GPU here.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None
    tl = None

MAX_T = 8192   # the reduce kernel holds a row of BLOCK_T distances in registers


def available():
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _token_dist_kernel(x_ptr, s_b, s_t, w_ptr, mu_ptr, cls_ptr, ids_ptr, dist_ptr, NVALID, T, D, LOWER,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SQUARED: tl.constexpr):
        pid = tl.program_id(0)
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = pos < NVALID
        tok = tl.load(ids_ptr + pos, mask=rmask, other=0)          # flat b * T + t, int64
        b = tok // T
        t = tok - b * T
        x_rows = x_ptr + b * s_b + t * s_t
        cls = tl.load(cls_ptr + b, mask=rmask, other=0)
        mu_rows = mu_ptr + cls * D
        q = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j0 in range(0, D, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < D
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            k_start = LOWER * ((j0 // BLOCK_K) * BLOCK_K)                # rows < j0 of a lower W are zero
            for k0 in range(k_start, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < D
                m2 = rmask[:, None] & kmask[None, :]
                xv = tl.load(x_rows[:, None] + ks[None, :], mask=m2, other=0.0)
                mv = tl.load(mu_rows[:, None] + ks[None, :], mask=m2, other=0.0)
                xc = tl.where(m2, xv.to(tl.float32) - mv, 0.0)
                wv = tl.load(w_ptr + ks[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                             other=0.0)
                acc += tl.dot(xc, wv, input_precision="ieee")
            acc = tl.where(cmask[None, :], acc, 0.0)                     # padded columns: 0, or NaN from inf * 0
            q += tl.sum(acc * acc, axis=1)
        val = tl.where(q < 0.0, 0.0, q)                                  # NaN stays NaN
        if not SQUARED:
            val = tl.sqrt(val)
        tl.store(dist_ptr + tok, val, mask=rmask)

    @triton.jit
    def _token_reduce_kernel(dist_ptr, mask_ptr, score_ptr, arg_ptr, B, T, NSEL, KEFF, BLOCK_T: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        ls = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK_T)
        inb = offs < T
        valid = (tl.load(mask_ptr + b * T + offs, mask=inb, other=0) != 0) & inb
        v = tl.load(dist_ptr + (ls * B + b) * T + offs, mask=valid, other=0.0)
        isnan = valid & (v != v)
        remaining = valid
        n = tl.sum(valid.to(tl.int32), axis=0)
        total = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), axis=0)
        first = tl.sum(tl.zeros([BLOCK_T], dtype=tl.int64), axis=0) - 1
        for i in range(0, KEFF):
            nan_left = tl.max(tl.where(remaining & isnan, 1, 0), axis=0) > 0
            plain = remaining & (v == v)
            vmax = tl.max(tl.where(plain, v, float("-inf")), axis=0)
            cand = tl.where(nan_left, remaining & isnan, plain & (v == vmax))
            pick = tl.min(tl.where(cand, offs, BLOCK_T), axis=0)
            take = pick < BLOCK_T
            sel = offs == pick
            total += tl.where(take, tl.sum(tl.where(sel, v, 0.0), axis=0), 0.0)
            first = tl.where((first < 0) & take, pick.to(tl.int64), first)   # the first pick
            remaining = remaining & (offs != pick)
        kk = tl.minimum(n, KEFF)
        score = tl.where(n > 0, total / tl.maximum(kk, 1).to(tl.float32), 0.0)
        tl.store(score_ptr + b * NSEL + ls, score)
        tl.store(arg_ptr + b * NSEL + ls, first)


def token_mahalanobis_triton(hidden, mask, means, whiteners, classes, layers, topk, squared,
                             block_m=32, block_n=64, block_k=32):
    if triton is None:
        raise RuntimeError("token_mahalanobis[triton]: triton is not installed")
    h0 = hidden[0]
    B, T, d = h0.shape
    nsel = len(layers)
    dev = h0.device
    scores = torch.empty((B, nsel), device=dev, dtype=torch.float32)
    argmax = torch.empty((B, nsel), device=dev, dtype=torch.int64)
    if B == 0:
        return scores, argmax
    if T > MAX_T:
        raise ValueError(f"token_mahalanobis[triton]: T = {T} > {MAX_T}; use the cuda or cpu backend")
    valid = (mask != 0).contiguous()
    ids = valid.reshape(-1).nonzero().squeeze(1)                          # flat ids of the valid tokens
    nvalid = ids.numel()
    cls = classes.contiguous() if classes is not None else torch.zeros(B, dtype=torch.int64, device=dev)
    dist = torch.empty((nsel, B * T), device=dev, dtype=torch.float32)
    sel = torch.as_tensor(layers, dtype=torch.long, device=dev)
    lower = (torch.triu(whiteners.index_select(0, sel), diagonal=1) == 0).flatten(1).all(dim=1).tolist()
    for ls, layer in enumerate(layers):
        if nvalid == 0:
            break
        x = hidden[layer] if hidden[layer].stride(2) == 1 else hidden[layer].contiguous()
        w = whiteners[layer].contiguous()
        mu = means[layer].contiguous()
        grid = (triton.cdiv(nvalid, block_m),)
        _token_dist_kernel[grid](x, x.stride(0), x.stride(1), w, mu, cls, ids, dist[ls], nvalid, T, d, int(lower[ls]),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SQUARED=squared)
    keff = max(1, min(topk, T))
    _token_reduce_kernel[(B, nsel)](dist, valid, scores, argmax, B, T, nsel, keff,
                                    BLOCK_T=max(triton.next_power_of_2(max(T, 1)), 16))
    return scores, argmax

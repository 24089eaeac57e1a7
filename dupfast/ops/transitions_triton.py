"""Triton layer transitions: one program per sample.

The program accumulates the fp64 Gram G [LP, LP] over d with fp64 tl.dot of [LP, BLOCK_D] feature
tiles (fp32 features times fp32 features are exact in fp64, and fp64 dot has no TF32 mode; bf16
features use a broadcast-and-sum instead, because Triton's fp64 MMA lowering rejects operands
widened from a 16-bit load — found by compiling for sm_80/sm_90 without a GPU), stores G
and the cosines, forms the difference Gram K = D G D^T (D the (L-1) x L first-difference operator,
two fp64 tl.dot) scaled to unit max diagonal, and diagonalises K by parallel-order Jacobi (the rotation of csrc/transitions_math.h,
applied to all disjoint pairs of a round-robin round at once as A <- J^T A J: m - 1 matrix products
per sweep instead of n(n-1)/2 scalar-indexed rotations, which Triton cannot express cheaply).
Tested under TRITON_INTERPRET=1 on CPU tensors; not run on a GPU here.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None
    tl = None

MAX_SWEEPS = 40     # as kTrMaxSweeps in csrc/transitions_math.h
OFF_TOL2 = 1e-26    # as kTrOffTol2


def available():
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _transitions_kernel(x_ptr, s_n, s_l, gram_ptr, cos_ptr, conc_ptr, L, D,
                            LP: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SWEEPS: tl.constexpr,
                            OFF_TOL2: tl.constexpr, GRAM_DOT: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        ri = tl.arange(0, LP)
        rmask = ri < L
        x_rows = x_ptr + sample * s_n + ri.to(tl.int64) * s_l

        # Gram in fp64, one pass over the sample's [L, d] features (fp32 x fp32 products are exact)
        G = tl.zeros([LP, LP], dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D):
            ks = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(x_rows[:, None] + ks[None, :], mask=rmask[:, None] & (ks[None, :] < D), other=0.0)
            h = h.to(tl.float32).to(tl.float64)
            if GRAM_DOT:
                G += tl.dot(h, tl.trans(h))
            else:  # 16-bit input: Triton's fp64 MMA cannot take operands widened from a 16-bit load
                G += tl.sum(h[:, None, :] * h[None, :, :], axis=2)
        r2 = ri[:, None]
        c2 = ri[None, :]
        gmask = (r2 < L) & (c2 < L)
        tl.store(gram_ptr + sample * L * L + r2 * L + c2, G.to(tl.float32), mask=gmask)

        bad = tl.sum(tl.where(gmask & ((G != G) | (tl.abs(G) == float("inf"))), 1, 0)) > 0
        G = tl.where(gmask & ~bad, G, 0.0)
        n = L - 1

        # cosines c_l = G[l, l+1] / sqrt(G[l, l] G[l+1, l+1])
        diag_r = tl.sum(tl.where(r2 == c2, G, 0.0), axis=1)           # G[l, l] indexed by row
        diag_c = tl.sum(tl.where(r2 == c2, G, 0.0), axis=0)           # G[c, c] indexed by column
        g_next = tl.sum(tl.where(c2 == r2 + 1, G, 0.0), axis=1)       # G[l, l+1]
        d_next = tl.sum(tl.where(c2 == r2 + 1, diag_c[None, :], 0.0), axis=1)  # G[l+1, l+1]
        ok = (diag_r > 0) & (d_next > 0)
        cosv = tl.where(ok, g_next / tl.sqrt(tl.where(ok, diag_r * d_next, 1.0)), 0.0)
        cosv = tl.minimum(tl.maximum(cosv, -1.0), 1.0)
        cosv = tl.where(bad, float("nan"), cosv)
        tl.store(cos_ptr + sample * n + ri, cosv.to(tl.float32), mask=ri < n)

        # K = D G D^T, D[i, r] = [r == i+1] - [r == i] for i < n
        Dm = tl.where(c2 == r2 + 1, 1.0, 0.0) - tl.where(c2 == r2, 1.0, 0.0)
        Dm = tl.where(r2 < n, Dm, 0.0).to(tl.float64)
        A = tl.dot(tl.dot(Dm, G), tl.trans(Dm))
        kdiag = tl.sum(tl.where(r2 == c2, A, 0.0), axis=1)
        dmax = tl.max(tl.where(ri < n, kdiag, 0.0), axis=0)
        A = A * tl.where(dmax > 0, 1.0 / tl.where(dmax > 0, dmax, 1.0), 0.0)

        # Parallel-order Jacobi: in each round of a round-robin tournament over m = n rounded up to
        # even players, the m/2 disjoint pairs (p, q) are all rotated at once, A <- J^T A J; m - 1
        # rounds make a sweep that annihilates every (p, q) once. Same rotation as the C++ (NR form).
        m = n + (n % 2)
        off = tl.sum(tl.sum(tl.where(c2 > r2, A * A, 0.0), axis=1), axis=0)
        dsq = tl.sum(tl.sum(tl.where(c2 == r2, A * A, 0.0), axis=1), axis=0)
        sweep = 0
        while (sweep < MAX_SWEEPS) & (off > OFF_TOL2 * dsq):
            for rnd in range(0, m - 1):
                partner = (2 * rnd - ri + 2 * (m - 1)) % (m - 1)
                partner = tl.where(ri == rnd, m - 1, partner)
                partner = tl.where(ri == m - 1, rnd, partner)
                paired = (ri < n) & (partner < n) & (partner != ri)
                partner = tl.where(paired, partner, ri)
                pc = partner[:, None] == c2                                  # [x, c]: c is x's partner
                diag_c = tl.sum(tl.where(r2 == c2, A, 0.0), axis=0)
                a_xx = tl.sum(tl.where(r2 == c2, A, 0.0), axis=1)
                a_yy = tl.sum(tl.where(pc, diag_c[None, :], 0.0), axis=1)
                a_xy = tl.sum(tl.where(pc, A, 0.0), axis=1)
                is_p = ri < partner
                app = tl.where(is_p, a_xx, a_yy)
                aqq = tl.where(is_p, a_yy, a_xx)
                tau = aqq - app
                sgn = tl.where(tau >= 0, 1.0, -1.0)
                den = tl.abs(tau) + tl.sqrt(tau * tau + 4.0 * a_xy * a_xy)
                t = 2.0 * a_xy * sgn / tl.where(den > 0, den, 1.0)
                t = tl.where(paired, t, 0.0)
                c = 1.0 / tl.sqrt(1.0 + t * t)
                s = t * c
                J = tl.where(r2 == c2, c[:, None], 0.0)
                J += tl.where(pc & paired[:, None], tl.where(is_p, s, -s)[:, None], 0.0)
                A = tl.dot(tl.trans(J), tl.dot(A, J))                        # J^T A J
                A = tl.where(pc & paired[:, None], 0.0, A)                    # the annihilated pairs
            off = tl.sum(tl.sum(tl.where(c2 > r2, A * A, 0.0), axis=1), axis=0)
            dsq = tl.sum(tl.sum(tl.where(c2 == r2, A * A, 0.0), axis=1), axis=0)
            sweep += 1

        lam = tl.sum(tl.where(r2 == c2, A, 0.0), axis=1)
        sig = tl.where((ri < n) & (lam > 0), tl.sqrt(tl.where(lam > 0, lam, 0.0)), 0.0)
        total = tl.sum(sig, axis=0)
        top = tl.max(sig, axis=0)
        conc = tl.where(total > 0, top / tl.where(total > 0, total, 1.0), 0.0)
        conc = tl.where(bad, float("nan"), conc)
        tl.store(conc_ptr + sample, conc.to(tl.float32))


def layer_transitions_triton(features, block_d=None):
    if triton is None:
        raise RuntimeError("layer_transitions[triton]: triton is not installed")
    x = features if features.stride(2) == 1 else features.contiguous()
    gram_dot = x.dtype == torch.float32
    n, n_layers, d = x.shape
    lp = max(triton.next_power_of_2(n_layers), 16)   # tl.dot needs every dimension >= 16
    if block_d is None:  # the broadcast form holds [LP, LP, BLOCK_D]: keep it at 8192 elements
        block_d = 32 if gram_dot else max(1, 8192 // (lp * lp))
    gram = torch.empty((n, n_layers, n_layers), device=x.device, dtype=torch.float32)
    cos = torch.empty((n, n_layers - 1), device=x.device, dtype=torch.float32)
    conc = torch.empty((n,), device=x.device, dtype=torch.float32)
    if n == 0:
        return gram, cos, conc
    _transitions_kernel[(n,)](x, x.stride(0), x.stride(1), gram, cos, conc, n_layers, d,
                              LP=lp, BLOCK_D=block_d, MAX_SWEEPS=MAX_SWEEPS, OFF_TOL2=OFF_TOL2, GRAM_DOT=gram_dot,
                              num_warps=8 if lp >= 64 else 4)
    return gram, cos, conc

"""dupfast.ops.token_mahalanobis: every available backend against an independent fp64 oracle.

Oracle (`oracle` below, numpy float64, written here from the definition, not the backends' code): per selected
layer and row, q_t = (h_t - mu)^T P (h_t - mu) with P = W W^T for every valid token, dist_t = sqrt(max(q_t, 0))
(q_t if squared), the valid tokens ranked NaN first, then by distance, ties to the lower index (Python's sort
on a key tuple); score = the fp64 mean of the first min(topk, n), argmax = the first (0 and -1 for n = 0). The
reference backend run in fp64 is this oracle's number to 1e-12 (test_reference_fp64_is_the_oracle).

Tolerance (oracle_rule.assert_rule, as tests/ops/test_mahalanobis.py): a backend's score error is at most
2x the error of plain PyTorch in fp32 (the reference backend: stack-free (h - mu) @ W, square-sum, masked
sort) plus an atol of 2e-6 x the largest score, and within an absolute fp32 bound that PyTorch must meet too:
per token, with S_j = sum_i |h_i - mu_i| |W_ij|, any fp32 evaluation of q is off by at most
c (sqrt(d) + 2) eps32 sum_j S_j^2 (c = 4, test_mahalanobis.fp32_bound's model, K = 1: the op centres on the
row's own mean), and a distance by min(sqrt(dq), dq / dist). A mean of the k largest of values each off by
at most e_t moves by at most max_t e_t (it is monotone and shifts with a common shift), so a score's bound is
the row's largest token bound plus the fp32 rounding of the mean, (k + 2) eps32 |score|. bf16 hidden states are
upcast exactly, so the oracle sees the same values and the bound does not change. The rule rejects a bf16
GEMM (test_fp32_rule_rejects_a_bf16_gemm).

Argmax: exactly the oracle's where the oracle's best token beats the runner-up by more than twice the row's
bound (decided rows; the tests require some), otherwise a valid token whose exact distance is within that
margin of the best. Exact ties are built from small integers (every fp32 sum exact in any order) so every
backend must return the LOWEST tied index, including ties split across the cpu backend's token blocks.

The Triton backend runs under TRITON_INTERPRET=1 on the small shapes (tests/conftest.py); the cuda backend
runs in test_gpu_backends_match_oracle on a GPU (skipped without one) and is compiled by
tests/ops/test_nvcc_compile.py and tests/test_cuda_compile.py. The per-row reduction header
(csrc/token_mahalanobis_math.h) runs on the host through the cpu op and through dupfast::token_mahalanobis_reduce,
which replays the CUDA kernel's 32-lane layout.
"""
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import oracle_rule
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dupfast import _ext
from dupfast.ops import _dispatch, token_mahalanobis
from dupfast.ops.token_mahalanobis import MAX_GPU_TOPK
from dupfast.ops.token_mahalanobis_reference import (reduce_rows_reference, token_distances_reference,
                                                     token_mahalanobis_reference)

OP = "token_mahalanobis"
HAS_CPU = _ext.has_op(OP)
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="dupfast._C with the token_mahalanobis op is not built")
HAS_TRITON = "triton" in _dispatch.available_backends(OP)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton (or TRITON_INTERPRET=1) unavailable")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
EPS32 = torch.finfo(torch.float32).eps
ROOT = pathlib.Path(__file__).resolve().parents[2]


def backends():
    """Every backend this build can run on CPU tensors (cuda has its own GPU test)."""
    return [b for b in _dispatch.available_backends(OP) if b != "cuda"]


# ---- problems ----------------------------------------------------------------------------------------------

def make_mask(B, T, g):
    """Right padding (even rows), left padding (odd rows), random holes in row 3; row 1 all pad, row 2 one token
    (when B allows), row 0 full."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    for b in range(B):
        n = int(lengths[b])
        if b % 2 == 0:
            mask[b, :n] = True
        else:
            mask[b, T - n:] = True
    mask[0] = True
    if B > 1:
        mask[1] = False
    if B > 2:
        mask[2] = False
        mask[2, (T - 1) // 2] = True
    if B > 3:
        mask[3] = torch.rand(T, generator=g) < 0.5
    return mask


def make_problem(B, T, L, d, K, seed=0, dtype=torch.float32, mean_spread=0.5, pad_value=1e6, general_w=False):
    """(hidden list of L [B, T, d], mask [B, T] bool, means [L, K, d], W [L, d, d], classes [B] or None).
    W is the lower Cholesky factor of the inverse of a shrunk sample covariance per layer (one layer at a time:
    see test_mahalanobis.make_problem on batched LU), or the symmetric inverse square root with general_w. Pad
    positions hold pad_value: a backend that reads them is far off."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(L, 1, d, generator=g, dtype=torch.float64) * 2 + 0.2
    centre = torch.randn(L, 1, d, generator=g, dtype=torch.float64)
    means = centre + mean_spread * torch.randn(L, K, d, generator=g, dtype=torch.float64)
    W = []
    for layer in range(L):
        fit = centre[layer] + scale[layer] * torch.randn(max(2 * d, 8), d, generator=g, dtype=torch.float64)
        fit = fit - fit.mean(dim=0, keepdim=True)
        cov = fit.T @ fit / fit.shape[0]
        cov = 0.9 * cov + 0.1 * cov.diagonal().mean() * torch.eye(d, dtype=torch.float64)
        prec = torch.linalg.inv(cov)
        if general_w:
            evals, evecs = torch.linalg.eigh(prec)
            W.append(evecs @ torch.diag(evals.sqrt()) @ evecs.T)
        else:
            W.append(torch.linalg.cholesky(prec))
    W = torch.stack(W)
    mask = make_mask(B, T, g)
    hidden = []
    for layer in range(L):
        h = centre[layer] + scale[layer] * torch.randn(B, T, d, generator=g, dtype=torch.float64)
        h[~mask] = pad_value
        hidden.append(h.to(dtype))
    classes = torch.randint(0, K, (B,), generator=g) if K > 1 else None
    return hidden, mask, means.float(), W.float(), classes


# ---- oracle and tolerance ----------------------------------------------------------------------------------

def _np(t):
    return t.detach().cpu().double().numpy()


def _layers(layers, n_layers):
    return list(range(n_layers)) if layers is None else [int(i) % n_layers for i in layers]


def _diffs(hidden, means, classes, layer):
    """h - mu of every token of a layer, in fp64 on the exact inputs: [B, T, d]."""
    h = _np(hidden[layer])
    cls = np.zeros(h.shape[0], dtype=np.int64) if classes is None else classes.cpu().numpy()
    return h - _np(means)[layer][cls][:, None, :]


def oracle_distances(hidden, means, W, classes, layers, squared):
    """[L', B, T] fp64: (h - mu)^T (W W^T) (h - mu) per token, sqrt(max(., 0)) unless squared."""
    out = []
    for layer in _layers(layers, len(hidden)):
        Wl = _np(W)[layer]
        P = Wl @ Wl.T
        diff = _diffs(hidden, means, classes, layer)
        with np.errstate(invalid="ignore", over="ignore"):
            q = ((diff @ P) * diff).sum(-1)
        out.append(q if squared else np.sqrt(np.maximum(q, 0)))   # np.maximum keeps NaN
    return np.stack(out)


def oracle_reduce(dist, valid, topk):
    """dist [L', B, T], valid [B, T] -> (scores [B, L'] fp64, argmax [B, L'] int64), from the definition."""
    nsel, B, _ = dist.shape
    scores, argmax = np.zeros((B, nsel)), np.full((B, nsel), -1, dtype=np.int64)
    for ls in range(nsel):
        for b in range(B):
            toks = np.flatnonzero(valid[b])
            ranked = sorted(toks, key=lambda t: (0, 0.0, t) if math.isnan(dist[ls, b, t]) else (1, -dist[ls, b, t], t))
            if not ranked:
                continue
            kept = ranked[:min(topk, len(ranked))]
            s = 0.0
            for t in kept:   # best first, as csrc/token_mahalanobis_math.h sums
                s += float(dist[ls, b, t])
            scores[b, ls] = s / len(kept)
            argmax[b, ls] = ranked[0]
    return scores, argmax


def oracle(hidden, mask, means, W, classes=None, layers=None, topk=1, squared=False):
    hidden = list(hidden.unbind(0)) if isinstance(hidden, torch.Tensor) else list(hidden)
    dist = oracle_distances(hidden, means, W, classes, layers, squared)
    scores, argmax = oracle_reduce(dist, (mask != 0).cpu().numpy(), topk)
    return scores, argmax, dist


def token_bounds(hidden, means, W, classes, layers, squared, dist, c=4.0):
    """[L', B, T]: the fp32 error bound of each token's distance (module docstring)."""
    d = hidden[0].shape[-1]
    out = []
    for ls, layer in enumerate(_layers(layers, len(hidden))):
        spread = np.abs(_diffs(hidden, means, classes, layer)) @ np.abs(_np(W)[layer])
        dq = c * (d ** 0.5 + 2) * EPS32 * np.square(spread).sum(-1)
        if squared:
            out.append(dq)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                out.append(np.fmin(np.sqrt(dq), dq / np.maximum(dist[ls], 1e-300)))
    return np.stack(out)


def score_bounds(tok_bound, valid, scores, topk):
    """[B, L']: the row's largest valid-token bound plus the rounding of the fp32 mean; 0 for an empty row."""
    n = valid.sum(1)
    row = np.where(valid[None], tok_bound, 0.0).max(-1).T                                 # [B, L']
    kk = np.minimum(n, topk)[:, None]
    return row + (kk + 2) * EPS32 * np.abs(np.nan_to_num(scores, nan=0.0, posinf=0.0))


def check_argmax(got, exact_arg, dist, valid, slack, what):
    """Exactly the oracle's where the oracle's best beats the runner-up by > slack (the row's 2x bound); else a
    valid token within slack of the best. Returns the number of decided (row, layer) pairs."""
    got = got.cpu().numpy()
    decided = 0
    for b in range(valid.shape[0]):
        toks = np.flatnonzero(valid[b])
        for ls in range(dist.shape[0]):
            if toks.size == 0:
                assert got[b, ls] == -1, f"{what}: row {b} has no valid token, argmax {got[b, ls]} != -1"
                continue
            a = int(got[b, ls])
            assert a in toks, f"{what}: row {b} layer {ls}: argmax {a} is not a valid token"
            d_row = dist[ls, b, toks]
            if np.isnan(d_row).any():
                assert a == exact_arg[b, ls], f"{what}: row {b} layer {ls}: NaN token {exact_arg[b, ls]} != {a}"
                continue
            best = dist[ls, b, exact_arg[b, ls]]
            assert dist[ls, b, a] >= best - slack[b, ls], (
                f"{what}: row {b} layer {ls}: argmax {a} at {dist[ls, b, a]:.6g}, "
                f"best {exact_arg[b, ls]} at {best:.6g}")
            others = np.delete(d_row, np.flatnonzero(toks == exact_arg[b, ls]))
            if others.size == 0 or best - others.max() > slack[b, ls]:
                assert a == exact_arg[b, ls], f"{what}: row {b} layer {ls}: argmax {a} != oracle {exact_arg[b, ls]}"
                decided += 1
    return decided


def check(out, hidden, mask, means, W, classes, layers, topk, squared, what, rel_atol=2e-6):
    """A backend's (scores, argmax) against the oracle, the fp32 PyTorch baseline and the fp32 bound."""
    scores, argmax = out
    hidden = list(hidden.unbind(0)) if isinstance(hidden, torch.Tensor) else list(hidden)
    exact, exact_arg, dist = oracle(hidden, mask, means, W, classes, layers, topk, squared)
    B, nsel = exact.shape
    assert scores.dtype == torch.float32 and argmax.dtype == torch.int64, what
    assert tuple(scores.shape) == tuple(argmax.shape) == (B, nsel), f"{what}: shapes {scores.shape}, {argmax.shape}"
    valid = (mask != 0).cpu().numpy()
    base, _ = token_mahalanobis_reference(hidden, mask, means, W, classes, layers, topk, squared)
    bound = score_bounds(token_bounds(hidden, means, W, classes, layers, squared, dist), valid, exact, topk)
    atol = rel_atol * max(1.0, float(np.nanmax(np.abs(np.where(np.isfinite(exact), exact, 0.0)))))
    oracle_rule.assert_rule(scores, torch.from_numpy(exact), base, torch.from_numpy(bound), what, atol)
    return check_argmax(argmax, exact_arg, dist, valid, 2 * bound, what)


# ---- every backend against the oracle ----------------------------------------------------------------------

# (B, T, L, d, K): T = 1, odd T, d = 1, a row longer than the cpu op's token block (256), d above its panel (128),
# K > 1 (classes); B = 37 rows make several row groups
SHAPES = [(1, 1, 1, 1, 1), (3, 1, 2, 5, 1), (4, 7, 2, 9, 2), (6, 13, 3, 17, 3), (9, 64, 3, 70, 1),
          (2, 300, 2, 24, 1), (37, 19, 2, 130, 2)]
TRITON_SHAPES = {(1, 1, 1, 1, 1), (3, 1, 2, 5, 1), (4, 7, 2, 9, 2), (6, 13, 3, 17, 3), (9, 64, 3, 70, 1)}


def _shape_id(s):
    return "B{}_T{}_L{}_d{}_K{}".format(*s)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backends())
def test_backend_matches_oracle(backend, dtype, shape):
    B, T, L, d, K = shape
    if backend == "triton" and shape not in TRITON_SHAPES:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    hidden, mask, means, W, classes = make_problem(B, T, L, d, K, seed=B + T + d, dtype=dtype)
    layers = [-1, 0] if L > 1 else None
    decided = 0
    for topk in sorted({1, 3, T + 2}):
        for squared in (False, True):
            out = token_mahalanobis(hidden, mask, means, W, classes=classes, layers=layers, topk=topk,
                                    squared=squared, backend=backend)
            decided += check(out, hidden, mask, means, W, classes, layers, topk, squared,
                             f"{backend} {dtype} {shape} topk={topk} squared={squared}")
    assert decided > 0, "no row's argmax was decided: the argmax check was vacuous"


@pytest.mark.parametrize("backend", backends())
def test_general_factor_not_triangular(backend):
    """A whitening factor that is not lower triangular must not be skipped over (d = 150: two cpu panels, three
    Triton column tiles)."""
    hidden, mask, means, W, classes = make_problem(5, 9, 2, 150, 2, seed=4, general_w=True)
    assert torch.triu(W, 1).abs().max() > 0
    out = token_mahalanobis(hidden, mask, means, W, classes=classes, topk=2, backend=backend)
    assert check(out, hidden, mask, means, W, classes, None, 2, False, f"{backend} general W") > 0


def test_reference_fp64_is_the_oracle():
    """The reference backend in fp64 is the oracle's number (1e-12) and argmax; in fp32 it meets the bound."""
    hidden, mask, means, W, classes = make_problem(7, 11, 3, 16, 2, seed=5)
    for topk in (1, 3, 13):
        exact, exact_arg, _ = oracle(hidden, mask, means, W, classes, None, topk)
        s64, a64 = token_mahalanobis_reference([h.double() for h in hidden], mask, means.double(), W.double(),
                                               classes, None, topk)
        assert s64.dtype == torch.float64
        np.testing.assert_allclose(s64.numpy(), exact, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(a64.numpy(), exact_arg)
        assert check(token_mahalanobis(hidden, mask, means, W, classes=classes, topk=topk, backend="reference"),
                     hidden, mask, means, W, classes, None, topk, False, f"reference fp32 topk={topk}") > 0


@pytest.mark.parametrize("shape", [(16, 40, 1, 384, 1), (8, 50, 1, 256, 2)], ids=_shape_id)
def test_fp32_rule_rejects_a_bf16_gemm(shape):
    """The bound is not vacuous: whitening with the centred tokens and W rounded to bf16 (fp32 accumulation,
    the usual bf16 GEMM) breaks it at detector-sized d."""
    hidden, mask, means, W, classes = make_problem(*shape, seed=1)
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    cls = torch.zeros(shape[0], dtype=torch.long) if classes is None else classes
    y = bf(hidden[0].float() - means[0][cls][:, None, :]) @ bf(W[0])
    s, a = reduce_rows_reference(y.square().sum(-1), mask, 1)
    with pytest.raises(AssertionError, match="fp32 bound"):
        check((s[:, None], a[:, None]), hidden, mask, means, W, classes, None, 1, True, "bf16 GEMM")


# ---- the contract's special cases --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
def test_list_tuple_and_stacked_hidden_are_identical(backend):
    hidden, mask, means, W, classes = make_problem(5, 9, 3, 12, 2, seed=2)
    stacked = torch.stack(hidden)
    outs = [token_mahalanobis(h, mask, means, W, classes=classes, topk=2, backend=backend)
            for h in (hidden, tuple(hidden), stacked)]
    for s, a in outs[1:]:
        assert torch.equal(s, outs[0][0]) and torch.equal(a, outs[0][1])


@pytest.mark.parametrize("backend", backends())
def test_all_pad_rows_and_single_token_rows(backend):
    """No valid token: score 0, argmax -1 (also T = 1 and an all-pad batch); exactly one valid token: the score is
    that token's distance for every topk and the argmax its index."""
    for T in (1, 6):
        hidden, mask, means, W, _ = make_problem(4, T, 2, 8, 1, seed=T)
        mask[:] = False
        mask[1, T - 1] = True
        mask[3, 0] = True
        exact, _, dist = oracle(hidden, mask, means, W)
        for topk in (1, 3, T + 2):
            s, a = token_mahalanobis(hidden, mask, means, W, topk=topk, backend=backend)
            assert torch.all(s[[0, 2]] == 0) and torch.all(a[[0, 2]] == -1), (T, topk)
            assert torch.all(a[1] == T - 1) and torch.all(a[3] == 0), (T, topk)
            np.testing.assert_allclose(s[[1, 3]].numpy(), dist[:, [1, 3], [T - 1, 0]].T, rtol=1e-5)
        s, a = token_mahalanobis(hidden, torch.zeros_like(mask), means, W, topk=2, backend=backend)
        assert torch.all(s == 0) and torch.all(a == -1)


def _integer_problem(B, T, L, d, seed):
    """Small-integer hidden states and means, W lower triangular with entries in {-1, 0, 1, 2} (a factor of a
    positive-definite precision): every product and sum is an integer below 2^24, exact in fp32 in any order,
    so equal tokens tie exactly in every backend."""
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randint(-3, 4, (B, T, d), generator=g).float() for _ in range(L)]
    means = torch.randint(-2, 3, (L, 1, d), generator=g).float()
    W = torch.tril(torch.randint(-1, 2, (L, d, d), generator=g).float(), -1) + 2 * torch.eye(d)
    return hidden, means, W


@pytest.mark.parametrize("backend", backends())
def test_argmax_ties_go_to_the_lowest_index(backend):
    """Constructed duplicates of the farthest token: the lowest index wins, in left- and right-padded rows, with
    pads before the first copy, and (T = 300, cpu) with the copies in different 256-token GEMM blocks."""
    T = 300 if backend != "triton" else 40
    B, L, d = 4, 2, 6
    hidden, means, W = _integer_problem(B, T, L, d, seed=7)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False                      # left padding: the first copy sits after pads
    mask[2, T - 7:] = False                  # right padding
    copies = {0: [3, T - 20], 1: [5, 9, T - 1], 2: [0, 17], 3: [T - 2, T - 1]}
    # farther than any randint(-3, 4) token: its last whitened coordinate alone is 2 * (40 - mu) >= 76, and
    # 76^2 > 25 * (7^2 + 6^2 + ... + 2^2), the most a random token's (|h - mu| <= 5) q can reach
    far = torch.full((d,), 40.0)
    for layer in range(L):
        for b, ts in copies.items():
            for t in ts:
                hidden[layer][b, t] = far * (1 + layer)
    for topk in (1, 3):
        s, a = token_mahalanobis(hidden, mask, means, W, topk=topk, backend=backend)
        for b, ts in copies.items():
            assert torch.all(a[b] == ts[0]), (backend, topk, b, a[b], ts)
        exact, exact_arg, _ = oracle(hidden, mask, means, W, topk=topk)
        np.testing.assert_array_equal(a.numpy(), exact_arg)
        np.testing.assert_allclose(s.numpy(), exact, rtol=1e-6)
    # every token at its row's mean: all distances 0, the first valid token wins
    same = [means[layer, 0].expand(B, T, d).clone() for layer in range(L)]
    s, a = token_mahalanobis(same, mask, means, W, topk=2, backend=backend)
    assert torch.all(s == 0)
    assert a[:, 0].tolist() == [0, 5, 0, 0] and torch.equal(a[:, 0], a[:, 1])


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("backend", backends())
def test_nan_and_inf_tokens(backend):
    """A NaN valid token ranks first (score NaN, argmax its lowest index); an infinite hidden value gives a
    non-finite distance (+inf, or NaN where a GEMM multiplies it by one of W's zeros: a Cholesky factor's upper
    triangle, a kernel's padded tile), which ranks above every number either way; NaN in pads is never read."""
    hidden, mask, means, W, _ = make_problem(5, 10, 2, 8, 1, seed=3, pad_value=float("nan"), general_w=True)
    assert mask[0].all() and mask[4, 0] and not mask[1].any()     # row 0 full, row 4 right-padded, row 1 all pad
    clean_s, clean_a = token_mahalanobis(hidden, mask, means, W, topk=3, backend=backend)
    assert torch.isfinite(clean_s).all() and torch.all(clean_a[1] == -1)
    hidden[1][0, 6, 2] = float("nan")
    hidden[1][0, 8, 0] = float("nan")
    hidden[0][4, 0, 3] = float("inf")
    s, a = token_mahalanobis(hidden, mask, means, W, topk=3, backend=backend)
    assert torch.isnan(s[0, 1]) and a[0, 1] == 6
    assert not torch.isfinite(s[4, 0]) and a[4, 0] == 0
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[0, 1] = keep[4, 0] = False
    assert torch.allclose(s[keep], clean_s[keep], rtol=1e-6) and torch.equal(a[keep], clean_a[keep])


@pytest.mark.parametrize("backend", backends())
def test_mask_dtypes(backend):
    """bool, int64 (an HF attention_mask), int32 and uint8 masks, nonzero values other than 1: one result."""
    hidden, mask, means, W, _ = make_problem(6, 9, 2, 10, 1, seed=8)
    base = token_mahalanobis(hidden, mask, means, W, topk=2, backend=backend)
    for m in (mask.long(), mask.int(), mask.to(torch.uint8), 3 * mask.long()):
        s, a = token_mahalanobis(hidden, m, means, W, topk=2, backend=backend)
        assert torch.equal(s, base[0]) and torch.equal(a, base[1]), m.dtype


@pytest.mark.parametrize("backend", backends())
def test_classes_pick_each_rows_mean(backend):
    """Row b with classes[b] = c gives what the K = 1 op gives on means[:, c] (same backend); K = 1 with classes
    of zeros equals classes=None."""
    hidden, mask, means, W, classes = make_problem(6, 8, 2, 12, 3, seed=9)
    s, a = token_mahalanobis(hidden, mask, means, W, classes=classes, topk=2, backend=backend)
    for c in range(3):
        s1, a1 = token_mahalanobis(hidden, mask, means[:, c:c + 1], W, topk=2, backend=backend)
        rows = classes == c
        assert torch.allclose(s[rows], s1[rows], rtol=1e-6, atol=1e-6) and torch.equal(a[rows], a1[rows]), c
    one = means[:, :1].contiguous()
    none = token_mahalanobis(hidden, mask, one, W, topk=2, backend=backend)
    zeros = token_mahalanobis(hidden, mask, one, W, classes=torch.zeros(6, dtype=torch.long), topk=2, backend=backend)
    assert torch.equal(none[0], zeros[0]) and torch.equal(none[1], zeros[1])


@pytest.mark.parametrize("backend", backends())
def test_layer_selection_forms(backend):
    hidden, mask, means, W, _ = make_problem(5, 6, 4, 8, 1, seed=10)
    full_s, full_a = token_mahalanobis(hidden, mask, means, W, backend=backend)
    assert full_s.shape == full_a.shape == (5, 4)
    for layers in ([3, 1], torch.tensor([3, 1]), [-1, 1], (3, 1)):
        s, a = token_mahalanobis(hidden, mask, means, W, layers=layers, backend=backend)
        assert torch.allclose(s, full_s[:, [3, 1]], rtol=1e-6) and torch.equal(a, full_a[:, [3, 1]]), layers


@pytest.mark.parametrize("backend", backends())
def test_empty_batch_and_no_tokens(backend):
    hidden, mask, means, W, _ = make_problem(3, 4, 2, 5, 1)
    s, a = token_mahalanobis([h[:0] for h in hidden], mask[:0], means, W, layers=[1], backend=backend)
    assert s.shape == a.shape == (0, 1) and s.dtype == torch.float32 and a.dtype == torch.int64
    s, a = token_mahalanobis([h[:, :0] for h in hidden], mask[:, :0], means, W, topk=3, backend=backend)
    assert s.shape == (3, 2) and torch.all(s == 0) and torch.all(a == -1)


# ---- the cpu backend ---------------------------------------------------------------------------------------

@needs_cpu
def test_cpu_reads_strided_layers_in_place():
    """Batch- and token-strided layers (views into larger tensors, a stacked tensor's slices) give the contiguous
    result bit for bit; a layer with a strided last dimension (copied) matches too."""
    hidden, mask, means, W, classes = make_problem(6, 9, 2, 20, 2, seed=11)
    base = token_mahalanobis(hidden, mask, means, W, classes=classes, topk=2, backend="cpu")
    wide = [torch.zeros(12, 18, 20) for _ in hidden]
    for w, h in zip(wide, hidden):
        w[::2, ::2] = h
    views = [w[::2, ::2] for w in wide]
    assert views[0].stride() == (2 * 18 * 20, 2 * 20, 1)
    transposed = [h.transpose(1, 2).contiguous().transpose(1, 2) for h in hidden]
    for other in (views, transposed):
        s, a = token_mahalanobis(other, mask, means, W, classes=classes, topk=2, backend="cpu")
        assert torch.equal(s, base[0]) and torch.equal(a, base[1])


@needs_cpu
def test_cpu_bf16_is_the_fp32_upcast():
    """bf16 hidden states give exactly the result of their fp32 upcast (exact upcast, same fp32 path)."""
    hidden, mask, means, W, classes = make_problem(9, 33, 2, 40, 2, seed=12, dtype=torch.bfloat16)
    s, a = token_mahalanobis(hidden, mask, means, W, classes=classes, topk=3, backend="cpu")
    s32, a32 = token_mahalanobis([h.float() for h in hidden], mask, means, W, classes=classes, topk=3, backend="cpu")
    assert torch.equal(s, s32) and torch.equal(a, a32)


@needs_cpu
def test_cpu_multiplies_only_valid_tokens():
    """Work proportional to the valid tokens: the op's GEMMs (ATen mm calls, seen by the profiler) multiply
    exactly the valid tokens, once per column panel, in blocks of at most 256. The problem is below the op's
    threading threshold (2^22 multiply-adds), so every call runs on the profiled thread."""
    from torch.profiler import ProfilerActivity, profile
    hidden, mask, means, W, _ = make_problem(7, 64, 2, 130, 1, seed=13)     # d = 130: two panels (128 + 2)
    nvalid = int(mask.sum())
    assert 0 < nvalid < mask.numel() and nvalid * 130 * 130 < 2**22
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        s, _ = token_mahalanobis(hidden, mask, means, W, layers=[1], backend="cpu")
    shapes = [e.input_shapes for e in prof.events() if e.name == "aten::mm"]
    rows = [sh[0][0] for sh in shapes]
    assert sum(rows) == 2 * nvalid and max(rows) <= 256, rows
    assert sorted({sh[1][1] for sh in shapes}) == [2, 128]                    # the two panels' widths
    assert torch.isfinite(s).all()                                            # pads hold 1e6: never read


@needs_cpu
def test_cpu_is_dispatched_on_cpu():
    if os.environ.get("DUPFAST_BACKEND"):
        pytest.skip("DUPFAST_BACKEND forces a backend")
    assert _dispatch.resolve(OP, torch.device("cpu"))[0] == "cpu"


@needs_cpu
def test_native_backend_rejects_other_dtypes():
    hidden, mask, means, W, _ = make_problem(3, 4, 2, 5, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        token_mahalanobis([h.double() for h in hidden], mask, means, W, backend="cpu")
    with pytest.raises(TypeError, match="must be float32"):
        token_mahalanobis(hidden, mask, means.double(), W, backend="cpu")


@needs_cpu
def test_direct_op_call_checks():
    """torch.ops.dupfast.token_mahalanobis checks its arguments itself (no Python wrapper in front)."""
    hidden, mask, means, W, _ = make_problem(3, 4, 2, 5, 2)
    op = torch.ops.dupfast.token_mahalanobis
    with pytest.raises(RuntimeError, match="need classes"):
        op(hidden, mask, means, W, None, [0], 1, False)
    with pytest.raises(RuntimeError, match="out of range"):
        op(hidden, mask, means, W, torch.tensor([0, 2, 1]), [0], 1, False)
    with pytest.raises(RuntimeError, match="layer index"):
        op(hidden, mask, means, W, torch.tensor([0, 1, 1]), [2], 1, False)
    with pytest.raises(RuntimeError, match="topk"):
        op(hidden, mask, means, W, torch.tensor([0, 1, 1]), [0], 0, False)


@needs_cpu
def test_torch_compile_and_meta():
    hidden, mask, means, W, classes = make_problem(5, 7, 3, 10, 2, seed=14)
    s, a = token_mahalanobis(hidden, mask, means, W, classes=classes, topk=2, backend="cpu")

    def direct(h0, h1, h2):
        out = torch.ops.dupfast.token_mahalanobis([h0, h1, h2], mask, means, W, classes, [0, 1, 2], 2, False)
        return out[0] * 2, out[1]

    compiled = torch.compile(direct, backend="aot_eager", fullgraph=True)
    s2, a2 = compiled(*hidden)
    assert torch.allclose(s2, 2 * s) and torch.equal(a2, a)
    meta = [h.to("meta") for h in hidden]
    ms, ma = token_mahalanobis(meta, mask.to("meta"), means.to("meta"), W.to("meta"), classes=classes.to("meta"),
                               layers=[1], backend="cpu")
    assert ms.device.type == ma.device.type == "meta"
    assert ms.shape == ma.shape == (5, 1) and ms.dtype == torch.float32 and ma.dtype == torch.int64


@needs_cpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 12), T=st.integers(1, 40), L=st.integers(1, 3), d=st.integers(1, 48), K=st.integers(1, 3),
       seed=st.integers(0, 2**16), bf16=st.booleans(), squared=st.booleans(), general_w=st.booleans(),
       data=st.data())
def test_cpu_property(B, T, L, d, K, seed, bf16, squared, general_w, data):
    topk = data.draw(st.integers(1, T + 2))
    layers = data.draw(st.lists(st.integers(-L, L - 1), min_size=1, max_size=L + 1))
    hidden, mask, means, W, classes = make_problem(B, T, L, d, K, seed=seed, general_w=general_w,
                                                   dtype=torch.bfloat16 if bf16 else torch.float32)
    out = token_mahalanobis(hidden, mask, means, W, classes=classes, layers=layers, topk=topk, squared=squared,
                            backend="cpu")
    check(out, hidden, mask, means, W, classes, layers, topk, squared, "cpu property")
    # rows are independent: a permuted batch gives the permuted result
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    s, a = token_mahalanobis([h[perm] for h in hidden], mask[perm], means, W,
                             classes=None if classes is None else classes[perm], layers=layers, topk=topk,
                             squared=squared, backend="cpu")
    assert torch.allclose(s, out[0][perm], rtol=1e-5, atol=1e-6 * max(1.0, out[0].abs().max().item()))


# ---- the reduction header on the host (through the cpu build) ----------------------------------------------

def _reduce_oracle(dist, mask, topk):
    scores, argmax = oracle_reduce(dist.double().numpy()[None], mask.numpy(), topk)
    # the header sums the float32 values best first in fp64, divides in fp64 and rounds once: so does this
    return torch.from_numpy(scores[:, 0]).float(), torch.from_numpy(argmax[:, 0])


@needs_cpu
@pytest.mark.parametrize("lanes", [1, 2, 7, 32])
def test_reduction_header_on_the_host(lanes):
    """dupfast::token_mahalanobis_reduce runs csrc/token_mahalanobis_math.h on the host with `lanes` kept lists
    per row (lanes = 32 with the pairwise merge: the CUDA reduce kernel's layout; 1: the cpu op's): bit for bit
    the definition on quantised values (many ties), NaN, +inf, -0.0 vs 0.0, all-pad rows and one-token rows,
    for topk from 1 to past T."""
    g = torch.Generator().manual_seed(lanes)
    R, T = 64, 45
    dist = (torch.randint(0, 6, (R, T), generator=g).float() * 0.5)
    dist[5, 3] = dist[5, 30] = float("nan")
    dist[6, 11] = float("inf")
    dist[7, :] = 0.0
    dist[7, 20] = -0.0
    dist[8, 40] = float("nan")
    dist[8, 2] = float("inf")
    mask = torch.rand(R, T, generator=g) < 0.6
    mask[0] = False
    mask[1] = False
    mask[1, 44] = True
    mask[5, 3] = mask[5, 30] = mask[6, 11] = mask[8, 40] = mask[8, 2] = True
    mask[7] = True
    dist[~mask & (torch.rand(R, T, generator=g) < 0.3)] = float("nan")   # NaN in pads: never read
    for topk in (1, 2, 3, 8, T, T + 2):
        s, a = torch.ops.dupfast.token_mahalanobis_reduce(dist, mask, topk, lanes)
        es, ea = _reduce_oracle(dist, mask, topk)
        assert torch.equal(a, ea), (topk, (a != ea).nonzero()[:5])
        assert torch.equal(s.isnan(), es.isnan()) and torch.equal(s[~s.isnan()], es[~es.isnan()]), topk
        assert a[0] == -1 and s[0] == 0 and a[1] == 44 and a[5] == 3 and a[6] == 11 and a[7] == 0 and a[8] == 40
        assert torch.isnan(s[5]) and torch.isnan(s[8])
        if topk == 1:
            assert torch.isinf(s[6])


@needs_cpu
def test_reduction_matches_the_reference_reduction():
    """The reference backend's sort-based reduction and the header's agree on random rows (argmax exactly)."""
    g = torch.Generator().manual_seed(0)
    dist = torch.randint(0, 20, (200, 33), generator=g).float()
    mask = torch.rand(200, 33, generator=g) < 0.5
    for topk in (1, 4, 40):
        s, a = torch.ops.dupfast.token_mahalanobis_reduce(dist, mask, topk, 32)
        rs, ra = reduce_rows_reference(dist, mask, topk)
        assert torch.equal(a, ra) and torch.allclose(s, rs, rtol=1e-6), topk


# ---- Triton -------------------------------------------------------------------------------------------------

@needs_triton
def test_gpu_backends_cap_topk():
    hidden, mask, means, W, _ = make_problem(2, MAX_GPU_TOPK + 2, 1, 4, 1)
    with pytest.raises(ValueError, match="min\\(topk, T\\)"):
        token_mahalanobis(hidden, mask, means, W, topk=MAX_GPU_TOPK + 1, backend="triton")


_TRITON_AOT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dupfast.ops import token_mahalanobis_triton as tt
DIST = {"x_ptr": None, "s_b": "i64", "s_t": "i64", "w_ptr": "*fp32", "mu_ptr": "*fp32", "cls_ptr": "*i64",
        "ids_ptr": "*i64", "dist_ptr": "*fp32", "NVALID": "i32", "T": "i32", "D": "i32", "LOWER": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SQUARED": "constexpr"}
RED = {"dist_ptr": "*fp32", "mask_ptr": "*i1", "score_ptr": "*fp32", "arg_ptr": "*i64", "B": "i32", "T": "i32",
       "NSEL": "i32", "KEFF": "i32", "BLOCK_T": "constexpr"}
failed = 0
for arch in (80, 90):
    cases = [(f"dist {x[1:]}", tt._token_dist_kernel, dict(DIST, x_ptr=x),
              dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, SQUARED=False)) for x in ("*fp32", "*bf16")]
    cases.append(("reduce", tt._token_reduce_kernel, RED, dict(BLOCK_T=64)))
    for name, fn, sig, consts in cases:
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4})
            print(f"ok   {name} sm_{arch}", flush=True)
        except Exception as exc:
            failed += 1
            print(f"FAIL {name} sm_{arch}: {str(exc).strip().splitlines()[-1][:300]}", flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter checks the numbers; this checks Triton's GPU compiler (bundled ptxas) accepts both kernels
    for sm_80 and sm_90, without a GPU (as tests/ops/test_triton_aot.py does for the other ops)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TRITON_AOT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert proc.returncode == 0 and len(lines) == 6 and all(ln.startswith("ok") for ln in lines), (
        proc.stdout + proc.stderr[-3000:])


# ---- bad input ----------------------------------------------------------------------------------------------

def _args(**kw):
    hidden = [torch.zeros(4, 5, 8) for _ in range(3)]
    args = dict(hidden=hidden, mask=torch.ones(4, 5, dtype=torch.bool), means=torch.zeros(3, 1, 8),
                whiteners=torch.eye(8).expand(3, 8, 8).contiguous())
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(hidden=torch.zeros(4, 5, 8)), ValueError, r"stacked \[L, B, T, d\]"),
    (dict(hidden=[]), ValueError, "no layers"),
    (dict(hidden="h"), TypeError, "list/tuple"),
    (dict(hidden=[torch.zeros(4, 5, 8), None, torch.zeros(4, 5, 8)]), TypeError, r"hidden\[1\] must be a torch"),
    (dict(hidden=[torch.zeros(4, 5, 8), torch.zeros(4, 6, 8), torch.zeros(4, 5, 8)]), ValueError, "differ in shape"),
    (dict(hidden=[torch.zeros(4, 5, 8), torch.zeros(4, 5, 8).bfloat16(), torch.zeros(4, 5, 8)]), TypeError,
     "differ in dtype"),
    (dict(hidden=[torch.zeros(4, 40)] * 3), ValueError, r"must be \[B, T, d\]"),
    (dict(hidden=[torch.zeros(4, 5, 8, dtype=torch.int32)] * 3), TypeError, "floating point"),
    (dict(hidden=[torch.zeros(4, 5, 0)] * 3), ValueError, "d = 0"),
    (dict(mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, r"mask must be \[B, T\]"),
    (dict(mask=torch.ones(4, 5)), TypeError, "bool or integer"),
    (dict(means=torch.zeros(3, 8)), ValueError, r"means must be \[L, K, d\]"),
    (dict(means=torch.zeros(2, 1, 8)), ValueError, r"means must be \[L, K, d\]"),
    (dict(means=torch.zeros(3, 0, 8)), ValueError, "K = 0"),
    (dict(whiteners=torch.zeros(3, 8, 7)), ValueError, r"whiteners must be \[L, d, d\]"),
    (dict(means=torch.zeros(3, 2, 8)), ValueError, "K = 2 means per layer: pass classes"),
    (dict(means=torch.zeros(3, 2, 8), classes=torch.tensor([0, 1, 2, 0])), ValueError, r"classes must be in \[0, K\)"),
    (dict(means=torch.zeros(3, 2, 8), classes=torch.tensor([0, -1, 1, 0])), ValueError, r"in \[0, K\)"),
    (dict(means=torch.zeros(3, 2, 8), classes=torch.tensor([0, 1, 1])), ValueError, r"classes must be \[B\]"),
    (dict(means=torch.zeros(3, 2, 8), classes=torch.zeros(4)), TypeError, "integer tensor"),
    (dict(means=torch.zeros(3, 2, 8), classes=[0, 1, 1, 0]), TypeError, "torch.Tensor or None"),
    (dict(means=torch.zeros(3, 1, 8, device="meta")), ValueError, "different devices"),
    (dict(mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError, "different devices"),
    (dict(means=torch.zeros(3, 2, 8), classes=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
     "different devices"),
    (dict(hidden=[torch.zeros(4, 5, 8), torch.zeros(4, 5, 8, device="meta"), torch.zeros(4, 5, 8)]), ValueError,
     "different devices"),
    (dict(layers=[]), ValueError, "layers is empty"),
    (dict(layers=[3]), ValueError, "out of range"),
    (dict(layers=[-4]), ValueError, "out of range"),
    (dict(layers=[0.5]), TypeError, "ints"),
    (dict(layers=torch.tensor([0.0])), TypeError, "integer tensor"),
    (dict(topk=0), ValueError, "topk must be an int >= 1"),
    (dict(topk=True), ValueError, "topk must be an int >= 1"),
    (dict(topk=1.5), ValueError, "topk must be an int >= 1"),
    (dict(squared=1), TypeError, "squared must be a bool"),
    (dict(backend="nope"), ValueError, "no 'nope' backend"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        token_mahalanobis(**_args(**kwargs))


# ---- GPU (skipped without one) ------------------------------------------------------------------------------

GPU_SHAPES = SHAPES + [(32, 64, 13, 384, 1), (32, 64, 13, 768, 2), (3, 1000, 2, 64, 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_oracle(backend, dtype, shape):
    if backend not in _dispatch.available_backends(OP):
        pytest.skip(f"{backend} is not available in this build")
    if backend == "triton" and INTERPRETED:
        pytest.skip("the Triton interpreter is on: run with DUPFAST_TEST_GPU=1")
    B, T, L, d, K = shape
    hidden, mask, means, W, classes = make_problem(B, T, L, d, K, seed=B + T + d, dtype=dtype)
    dev = [h.cuda() for h in hidden]
    mask_d, means_d, W_d = mask.cuda(), means.cuda(), W.cuda()
    cls_d = None if classes is None else classes.cuda()
    layers = [-1, 0] if L > 1 else None
    for topk in sorted({1, 3, min(T + 2, MAX_GPU_TOPK)}):
        for squared in (False, True):
            s, a = token_mahalanobis(dev, mask_d, means_d, W_d, classes=cls_d, layers=layers, topk=topk,
                                     squared=squared, backend=backend)
            torch.cuda.synchronize()
            assert s.is_cuda and a.is_cuda
            check((s.cpu(), a.cpu()), hidden, mask, means, W, classes, layers, topk, squared,
                  f"{backend} {dtype} {shape} topk={topk} squared={squared}")
        s2, a2 = token_mahalanobis(torch.stack(dev), mask_d.long(), means_d, W_d, classes=cls_d, layers=layers,
                                   topk=topk, backend=backend)
        s1, a1 = token_mahalanobis(dev, mask_d, means_d, W_d, classes=cls_d, layers=layers, topk=topk,
                                   backend=backend)
        assert torch.equal(s1, s2) and torch.equal(a1, a2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_ties_and_empty_rows():
    if "cuda" not in _dispatch.available_backends(OP):
        pytest.skip("the extension has no CUDA kernel")
    B, T, L, d = 4, 300, 2, 6
    hidden, means, W = _integer_problem(B, T, L, d, seed=7)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3] = False
    for layer in range(L):
        hidden[layer][0, [40, 3, 290]] = 40.0
    s, a = token_mahalanobis([h.cuda() for h in hidden], mask.cuda(), means.cuda(), W.cuda(), topk=3, backend="cuda")
    exact, exact_arg, _ = oracle(hidden, mask, means, W, topk=3)
    assert a[0].tolist() == [3, 3] and a[3].tolist() == [-1, -1] and torch.all(s[3].cpu() == 0)
    np.testing.assert_array_equal(a.cpu().numpy(), exact_arg)
    np.testing.assert_allclose(s.cpu().numpy(), exact, rtol=1e-6)

"""dupfast.ops.mahalanobis: every available backend against an independent fp64 oracle.

The oracle is (x - mu)^T P (x - mu) with P = W W^T, in numpy float64, written here: not the reference
backend's code, which is held to it like the kernels.

Rule (precision="fp32", the default; oracle_rule.assert_rule): a backend's error vs the oracle is at most 2x
the error of plain PyTorch in fp32 (the better of the reference's two forms) plus a small atol scaled to the
distances, and within an absolute fp32 bound (fp32_bound) that PyTorch must meet too. bf16 features are
upcast, so this holds for them on every CPU.

Rule (precision="bf16", opt-in): every output is within `bf16_error_bound` of the fp64 oracle, the
bound derived from the path's rounding model (dupfast/ops/mahalanobis.py). That path runs natively where
the CPU has AVX512-BF16/AMX and through oneDNN's emulation elsewhere; both are tested where they can run.
"""
import os
import subprocess
import sys

import numpy as np
import oracle_rule
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dupfast import _ext
from dupfast.ops import _dispatch, mahalanobis
from dupfast.ops.mahalanobis import native_bf16_cpu
from dupfast.ops.mahalanobis_reference import (bf16_error_bound, mahalanobis_bf16_reference,
                                               mahalanobis_precision_reference, mahalanobis_reference,
                                               mahalanobis_whitened_reference)

HAS_CPU = _ext.has_op("mahalanobis")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="dupfast._C with the mahalanobis op is not built")
HAS_TRITON = "triton" in _dispatch.available_backends("mahalanobis")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton (or TRITON_INTERPRET=1) unavailable")
EPS32 = torch.finfo(torch.float32).eps


def make_problem(n, n_layers, d, k, seed=0, dtype=torch.float32, mean_spread=0.5, general_w=False):
    """Features, per-layer means and whitening factors shaped like a fitted detector's: W is the lower
    Cholesky factor of the inverse of a shrunk sample covariance (or, with general_w, the symmetric
    inverse square root, which is not triangular)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n_layers, 1, d, generator=g, dtype=torch.float64) * 2 + 0.2
    centre = torch.randn(n_layers, 1, d, generator=g, dtype=torch.float64)
    means = centre + mean_spread * torch.randn(n_layers, k, d, generator=g, dtype=torch.float64)
    fit = centre + scale * torch.randn(n_layers, max(2 * d, 8), d, generator=g, dtype=torch.float64)
    fit = fit - fit.mean(dim=1, keepdim=True)
    cov = fit.transpose(1, 2) @ fit / fit.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    cov = 0.9 * cov + 0.1 * cov.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    # One layer at a time: MKL's batched LU (torch.linalg.inv on [L, d, d], d >~ 128) after
    # torch.set_num_threads(2) fails with "Parameter 6 was incorrect on entry to DLASWP" and livelocks on
    # the AMD EPYC (Zen 4) machines; unbatched calls are fine (dupfast.detect.stats factors per layer too).
    W = []
    for c in cov:
        prec = torch.linalg.inv(c)
        if general_w:
            evals, evecs = torch.linalg.eigh(prec)
            W.append(evecs @ torch.diag(evals.sqrt()) @ evecs.T)
        else:
            W.append(torch.linalg.cholesky(prec))
    W = torch.stack(W)
    feats = (centre.transpose(0, 1) + scale.transpose(0, 1)
             * torch.randn(n, n_layers, d, generator=g, dtype=torch.float64))
    return feats.to(dtype), means.float(), W.float()


def oracle(features, means, whiteners, layers=None, reduce="min", squared=False):
    """fp64 (x - mu_k)^T (W W^T) (x - mu_k) per sample, layer and mean, in numpy, on exactly the inputs the
    backends see; sqrt(max(q, 0)) unless squared; min over the means (NaN propagates)."""
    x, mu, W = (t.detach().cpu().double().numpy() for t in (features, means, whiteners))
    out = []
    for layer in (range(x.shape[1]) if layers is None else [int(i) for i in layers]):
        P = W[layer] @ W[layer].T
        diff = x[:, layer, None, :] - mu[layer][None]                    # [N, K, d]
        with np.errstate(invalid="ignore", over="ignore"):               # inf / NaN inputs give NaN / inf
            out.append(((diff @ P) * diff).sum(-1))                      # (x - mu)^T P (x - mu)
    q = np.stack(out, axis=1)                                            # [N, L', K]
    dist = q if squared else np.sqrt(np.maximum(q, 0))
    return torch.from_numpy(dist.min(axis=-1) if reduce == "min" else dist)


def fp32_bound(features, means, whiteners, layers=None, reduce="min", squared=False, c=4.0):
    """Absolute fp32 error bound per output: with S_j = sum_i (|x_i - mu0_i| + |mu_ki - mu0_i|) |W_ij| (mu0 the
    means' centroid the native ops centre at, s.t. S bounds both the centred products and (x - mu_k) W), every
    fp32 form's q_k is off by at most ~c (sqrt(d) + 2) eps32 sum_j S_j^2 (sqrt(d): the d roundings of a sum add
    like a random walk, and S_j^2 is already a worst case); sqrt turns dq into min(sqrt(dq), dq / dist).
    Measured: fp32 backends and PyTorch reach 0.12 of it; precision="bf16"'s output, 1.6x to 8000x.
    (numpy: torch's 2-thread fp64 GEMMs spin-wait on a busy 2-core machine, 30x slower measured.)"""
    x, mu, W = (t.detach().cpu().double().numpy() for t in (features, means, whiteners))
    d = x.shape[2]
    per_layer = []
    for layer in (range(x.shape[1]) if layers is None else [int(i) for i in layers]):
        Wa, mu0 = np.abs(W[layer]), mu[layer].mean(0)
        spread = np.abs(x[:, layer] - mu0) @ Wa                          # [N, d]
        b = []
        for m in mu[layer]:
            S = spread + np.abs(m - mu0) @ Wa
            dq = c * (d ** 0.5 + 2) * EPS32 * np.square(S).sum(-1)
            if squared:
                b.append(dq)
            else:
                dist = np.sqrt(np.square((x[:, layer] - m) @ W[layer]).sum(-1))
                with np.errstate(divide="ignore", invalid="ignore"):
                    b.append(np.fmin(np.sqrt(dq), dq / np.maximum(dist, 1e-300)))
        per_layer.append(np.stack(b, -1))
    bound = torch.from_numpy(np.stack(per_layer, 1))
    return bound.amax(-1) if reduce == "min" else bound


def reference_outputs(features, means, whiteners, layers, reduce, squared, exact):
    """Plain PyTorch in fp32: the better (vs the oracle) of the reference's two forms, the rule's baseline."""
    outs = [form(features, means, whiteners, layers, reduce, squared)
            for form in (mahalanobis_reference, mahalanobis_whitened_reference)]
    return min(outs, key=lambda o: (o.double().cpu() - exact).abs().nan_to_num(float("inf")).max().item())


def assert_rule(out, exact, base, what, bound, rel_atol=2e-6):
    """oracle_rule.assert_rule with the atol of the relative part scaled to the distances."""
    assert out.dtype == torch.float32, what
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    atol = rel_atol * max(1.0, exact.abs().max().item())
    oracle_rule.assert_rule(out, exact, base, bound, what, atol)


def check(out, feats, means, W, layers, reduce, squared, what):
    """out (a backend's) against the oracle, PyTorch fp32 and the fp32 bound."""
    exact = oracle(feats, means, W, layers, reduce, squared)
    base = reference_outputs(feats, means, W, layers, reduce, squared, exact)
    assert_rule(out, exact, base, what, fp32_bound(feats, means, W, layers, reduce, squared))


def backends():
    """Every backend this build can run here (cuda has its own GPU tests)."""
    return [b for b in _dispatch.available_backends("mahalanobis") if b != "cuda"]


# (N, L, d, K): d = 1, L = 1, odd N, N above the CPU row block (256), d above its panel (128)
SHAPES = [(1, 1, 1, 1), (7, 2, 1, 1), (5, 3, 9, 2), (33, 3, 17, 3), (20, 2, 70, 2), (300, 2, 130, 2),
          (257, 4, 64, 1)]
TRITON_SHAPES = {(1, 1, 1, 1), (7, 2, 1, 1), (5, 3, 9, 2), (33, 3, 17, 3), (20, 2, 70, 2)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_L{}_d{}_K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backends())
def test_backend_matches_oracle(backend, dtype, shape):
    n, n_layers, d, k = shape
    if backend == "triton" and shape not in TRITON_SHAPES:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    feats, means, W = make_problem(n, n_layers, d, k, seed=n + d, dtype=dtype)
    layers = [n_layers - 1, 0] if n_layers > 1 else None
    for reduce in ("min", "none"):
        for squared in (False, True):
            out = mahalanobis(feats, means, W, layers=layers, reduce=reduce, squared=squared, backend=backend)
            what = f"{backend} {dtype} {shape} {reduce} squared={squared}"
            check(out, feats, means, W, layers, reduce, squared, what)


def test_reference_forms_agree_with_oracle():
    """Both reference forms: in fp64 they are the oracle's number to ~1e-12; in fp32 within the fp32 bound
    (so the rule's baseline is itself close to the oracle)."""
    feats, means, W = make_problem(40, 3, 24, 2)
    exact = oracle(feats, means, W, reduce="none")
    bound = fp32_bound(feats, means, W, reduce="none")
    for form in (mahalanobis_reference, mahalanobis_whitened_reference):
        out = form(feats, means, W, reduce="none")
        assert out.dtype == torch.float32
        assert ((out.double() - exact).abs() <= bound).all(), form.__name__
        out64 = form(feats.double(), means.double(), W.double(), reduce="none")
        assert torch.allclose(out64, exact, rtol=1e-12, atol=1e-12), form.__name__
    Wd = W.double()
    prec = mahalanobis_precision_reference(feats.double(), means.double(), Wd @ Wd.transpose(1, 2),
                                           reduce="none")
    assert torch.allclose(prec, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(300, 2, 130, 2), (64, 2, 384, 2)], ids=lambda s: "N{}_L{}_d{}_K{}".format(*s))
def test_fp32_rule_rejects_a_bf16_gemm(shape):
    """The fp32 rule's bound is not vacuous: precision="bf16"'s emulation (a bf16 GEMM with fp32
    accumulation, rounded to bf16) breaks it at the largest shapes, where the bound is loosest."""
    feats, means, W = make_problem(*shape, seed=1)
    out = mahalanobis_bf16_reference(feats, means, W, squared=True)
    with pytest.raises(AssertionError, match="fp32 bound"):
        check(out, feats, means, W, None, "min", True, "bf16 GEMM")


@pytest.mark.parametrize("backend", backends())
def test_general_factor_not_triangular(backend):
    """A whitening factor that is not lower triangular (symmetric P^1/2) must not be skipped over
    (d = 150 spans several CPU panels of 128 and Triton tiles of 64)."""
    feats, means, W = make_problem(19, 2, 150, 2, general_w=True)
    assert torch.triu(W, 1).abs().max() > 0
    check(mahalanobis(feats, means, W, reduce="none", backend=backend), feats, means, W, None, "none", False, backend)


@pytest.mark.parametrize("backend", backends())
def test_layer_selection_forms(backend):
    feats, means, W = make_problem(11, 4, 8, 2)
    full = mahalanobis(feats, means, W, backend=backend)
    assert full.shape == (11, 4)
    for layers in ([3, 1], torch.tensor([3, 1]), [-1, 1], (3, 1)):
        out = mahalanobis(feats, means, W, layers=layers, backend=backend)
        assert torch.allclose(out, full[:, [3, 1]], rtol=1e-5, atol=1e-6), layers


@pytest.mark.parametrize("backend", backends())
def test_sample_at_mean_is_zero_and_nonfinite_rows_propagate(backend):
    feats, means, W = make_problem(6, 2, 12, 1)
    feats[0] = means[:, 0]                      # exactly at the mean in every layer
    feats[2, 1, 3] = float("nan")
    feats[4, 0, 5] = float("inf")
    out = mahalanobis(feats, means, W, backend=backend)
    assert torch.all(out[0] == 0)
    assert torch.isnan(out[2, 1])
    assert not torch.isfinite(out[4, 0])
    clean = torch.ones_like(out, dtype=torch.bool)
    clean[2, 1] = clean[4, 0] = False
    assert torch.isfinite(out[clean]).all()
    exact = oracle(feats, means, W)
    assert torch.allclose(out[clean].double(), exact[clean], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_nan_in_one_mean_gives_nan_min(backend):
    """min over K must not silently skip a NaN distance (fminf would under fast-math)."""
    feats, means, W = make_problem(5, 1, 6, 2)
    means[0, 1, 0] = float("nan")
    out = mahalanobis(feats, means, W, backend=backend)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", backends())
def test_cancellation_many_means_far_from_origin(backend):
    """K > 1 with one GEMM: samples sit near one of two means that are far from the origin and from
    each other. The expanded form ||xW||^2 - 2 xW.S + ||S||^2 loses everything here; the centred
    difference ||Y - S_k||^2 of the native backends keeps the error ~eps * ||S_k|| / ||Y - S_k||."""
    g = torch.Generator().manual_seed(3)
    n_layers, d, n = 1, 16, 64
    W = torch.eye(d).expand(n_layers, d, d).contiguous()
    means = torch.zeros(n_layers, 2, d)
    means[0, 0] = 1000.0
    means[0, 1] = 1000.0
    means[0, 1, 0] = 1030.0                          # whitened separation 30, samples at distance ~4
    feats = means[0, torch.arange(n) % 2][:, None, :] + torch.randn(n, n_layers, d, generator=g)
    exact = oracle(feats, means, W, reduce="none", squared=True)
    out = mahalanobis(feats, means, W, reduce="none", squared=True, backend=backend)
    rel = ((out.double() - exact).abs() / exact).max().item()
    assert rel < 1e-4, rel
    # what the expanded form gives in fp32 on the same data (the choice this op avoids)
    y = feats[:, 0] @ W[0]
    s = means[0] @ W[0]
    expanded = (y.square().sum(-1, keepdim=True) - 2 * y @ s.T + s.square().sum(-1)[None]).double()
    assert ((expanded - exact[:, 0]).abs() / exact[:, 0]).max() > 100 * rel


@needs_cpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_L{}_d{}_K{}".format(*s))
def test_bf16_features_default_is_the_fp32_upcast(shape):
    """The default never takes a CPU-dependent shortcut: bf16 features give exactly the distances of
    their (exact) fp32 upcast, whatever the CPU supports."""
    n, n_layers, d, k = shape
    feats, means, W = make_problem(n, n_layers, d, k, seed=n + d, dtype=torch.bfloat16)
    for reduce in ("min", "none"):
        out = mahalanobis(feats, means, W, reduce=reduce, backend="cpu")
        assert torch.equal(out, mahalanobis(feats.float(), means, W, reduce=reduce, backend="cpu")), reduce


SIGMAS = 6  # statistical tolerance: 6 standard deviations of the first-order rounding model


def assert_within_bf16_bound(out, feats, means, W, layers, reduce, squared, what):
    """Within the rigorous worst-case bound, and within 6 sigma of the statistical model (the tighter
    of the two at d >~ 20, so a systematic error of a fraction of a percent is caught)."""
    exact = oracle(feats, means, W, layers, reduce, squared)
    assert out.dtype == torch.float32 and out.shape == exact.shape, what
    err = (out.double() - exact).abs()
    for sigmas in (None, SIGMAS):
        bound = bf16_error_bound(feats, means, W, layers, reduce, squared, sigmas=sigmas)
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst]:.3g} > bound "
                                      f"{bound.flatten()[worst]:.3g} (sigmas={sigmas})")


BF16_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])


@pytest.mark.parametrize("shape", SHAPES + [(64, 2, 384, 2)], ids=lambda s: "N{}_L{}_d{}_K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_precision_within_error_bound(backend, dtype, shape):
    n, n_layers, d, k = shape
    feats, means, W = make_problem(n, n_layers, d, k, seed=n + d, dtype=dtype)
    layers = [n_layers - 1, 0] if n_layers > 1 else None
    for reduce in ("min", "none"):
        for squared in (False, True):
            out = mahalanobis(feats, means, W, layers=layers, reduce=reduce, squared=squared, backend=backend,
                              precision="bf16")
            assert_within_bf16_bound(out, feats, means, W, layers, reduce, squared,
                                     f"{backend} {dtype} {shape} {reduce} squared={squared}")


def test_bf16_error_bound_is_tight_enough_to_fail():
    """The tolerance must not be vacuous: at d = 384 the 6-sigma bound is under 1% of every squared
    distance, so a result off by 1% fails it, while the emulation of the modelled path passes."""
    feats, means, W = make_problem(300, 1, 384, 2, seed=1)
    exact = oracle(feats, means, W, squared=True)
    bound = bf16_error_bound(feats, means, W, squared=True, sigmas=SIGMAS)
    assert ((0.01 * exact) > bound).all()
    assert (bound <= bf16_error_bound(feats, means, W, squared=True)).all()
    emulated = mahalanobis_bf16_reference(feats, means, W, squared=True)
    assert_within_bf16_bound(emulated, feats, means, W, None, "min", True, "emulation")
    with pytest.raises(AssertionError, match="bound"):
        assert_within_bf16_bound(emulated * 1.01, feats, means, W, None, "min", True, "1% off")


@needs_cpu
@pytest.mark.skipif(not native_bf16_cpu(), reason="this CPU has no AVX512-BF16/AMX: the native bf16 GEMM "
                    "cannot run here (the emulated path is tested in-process instead)")
def test_bf16_precision_runs_native_bf16_gemm(capfd):
    """Where the CPU has bf16 dot products, precision='bf16' really reaches oneDNN's native bf16 kernel
    (checked in oneDNN's own verbose log) and is within the bound."""
    feats, means, W = make_problem(300, 1, 256, 1, dtype=torch.bfloat16)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        out = mahalanobis(feats, means, W, backend="cpu", precision="bf16")
    log = capfd.readouterr().out
    kernels = [line for line in log.splitlines() if ",exec," in line and "matmul" in line]
    assert kernels, "no oneDNN matmul ran for the bf16 GEMM"
    assert any("src:bf16" in line and ("avx512_core_bf16" in line or "amx" in line)
               for line in kernels), kernels[:2]
    assert_within_bf16_bound(out, feats, means, W, None, "min", False, "native bf16")


@needs_cpu
@pytest.mark.skipif(not native_bf16_cpu(), reason="this CPU has no native bf16: the in-process tests already "
                    "run the emulated bf16 GEMM")
@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") is not None, reason="already capped (the subprocess)")
def test_bf16_precision_emulated_path_on_a_native_cpu():
    """On a CPU with native bf16, the path a CPU without it takes (oneDNN capped at AVX512_CORE: bf16
    emulated) is run in a subprocess and held to the same bound."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "bf16_precision_within_error_bound and cpu and not d384"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-1000:]


@needs_cpu
def test_bf16_packing_rounds_like_torch():
    """The op's vectorised float -> bf16 rounding (csrc/float_bits.h) is torch's round-to-nearest-even:
    with d = 1 and W = 1 the squared distance is exactly bf16(x - mu)^2, compared bit for bit on values
    across magnitudes, exact ties (odd and even), signed zeros, denormals, inf and NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * torch.logspace(-30, 30, 4000)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 2**-8), 255.5, 2**-130, 3e38])
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])
    feats = x[:, None, None]
    means = torch.zeros(1, 1, 1)
    W = torch.ones(1, 1, 1)
    out = mahalanobis(feats, means, W, reduce="none", squared=True, backend="cpu", precision="bf16")[:, 0, 0]
    y = x.to(torch.bfloat16).float()    # y = bf16(x - 0) * 1: the GEMM's bf16 output is exact
    q = y * y
    finite = torch.isfinite(x)
    assert torch.equal(out[finite], q[finite])
    assert torch.isnan(out[x.isnan()]).all() and torch.isinf(out[x.isinf()]).all()


@needs_triton
def test_bf16_precision_rejected_where_not_implemented():
    feats, means, W = make_problem(3, 1, 4, 1)
    with pytest.raises(ValueError, match="precision='bf16' is implemented by the cpu and reference"):
        mahalanobis(feats, means, W, backend="triton", precision="bf16")


def test_bad_precision():
    feats, means, W = make_problem(3, 1, 4, 1)
    with pytest.raises(ValueError, match="precision must be one of"):
        mahalanobis(feats, means, W, precision="fp16")


@needs_cpu
def test_cpu_strided_features():
    feats, means, W = make_problem(40, 3, 24, 2)
    wide = torch.zeros(40, 5, 24)
    wide[:, 1:4] = feats
    view = wide[:, 1:4]                                          # row strides 120 and 24
    transposed = feats.transpose(1, 2).contiguous().transpose(1, 2)  # last-dim stride != 1
    base = mahalanobis(feats, means, W, backend="cpu")
    assert torch.equal(mahalanobis(view, means, W, backend="cpu"), base)
    assert torch.allclose(mahalanobis(transposed, means, W, backend="cpu"), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_whitener_layouts(backend):
    """Row-major, column-major (what batched torch.linalg.cholesky returns) and non-BLAS strided W
    give the same distances; the cpu op uses the first two in place."""
    feats, means, W = make_problem(30, 2, 140, 2)
    row = W.contiguous()
    col = W.transpose(1, 2).contiguous().transpose(1, 2)
    assert col.stride(1) == 1 or col.stride(2) != 1
    big = torch.zeros(2, 280, 280)
    big[:, ::2, ::2] = W
    strided = big[:, ::2, ::2]
    base = mahalanobis(feats, means, row, reduce="none", backend=backend)
    for other in (col, strided):
        assert torch.allclose(mahalanobis(feats, means, other, reduce="none", backend=backend), base,
                              rtol=1e-5, atol=1e-5)


@needs_cpu
def test_cpu_is_dispatched_on_cpu():
    if os.environ.get("DUPFAST_BACKEND"):
        pytest.skip("DUPFAST_BACKEND forces a backend")
    name, _ = _dispatch.resolve("mahalanobis", torch.device("cpu"))
    assert name == "cpu"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo (Linux)")
def test_native_bf16_cpu_follows_the_cpu_flags():
    """native_bf16_cpu() is True exactly where the kernel reports AMX-BF16 or AVX512-BF16 (and the OS allows
    AMX: the amx_bf16 flag is only listed when it does)."""
    with open("/proc/cpuinfo") as f:
        flags = set().union(*(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    assert native_bf16_cpu() is bool({"amx_bf16", "avx512_bf16"} & flags), sorted(f for f in flags if "bf16" in f)


@needs_cpu
def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DUPFAST_BACKEND", "reference")
    assert _dispatch.resolve("mahalanobis", torch.device("cpu"))[0] == "reference"


def test_empty_batch():
    feats, means, W = make_problem(3, 2, 5, 2)
    for backend in backends():
        out = mahalanobis(feats[:0], means, W, reduce="none", backend=backend)
        assert out.shape == (0, 2, 2), backend


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(features=torch.zeros(4, 8)), ValueError, r"features must be \[N, L, d\]"),
    (dict(means=torch.zeros(3, 8)), ValueError, r"means must be \[L, K, d\]"),
    (dict(means=torch.zeros(3, 0, 8)), ValueError, "K = 0"),
    (dict(whiteners=torch.zeros(3, 8, 7)), ValueError, r"whiteners must be \[L, d, d\]"),
    (dict(features=torch.zeros(4, 3, 8, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(layers=[3]), ValueError, "out of range"),
    (dict(layers=[]), ValueError, "empty"),
    (dict(layers=[0.5]), TypeError, "ints"),
    (dict(layers=torch.tensor([0.0])), TypeError, "integer tensor"),
    (dict(reduce="max"), ValueError, "reduce must be one of"),
    (dict(squared=1), TypeError, "squared must be a bool"),
    (dict(backend="nope"), ValueError, "no 'nope' backend"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(features=torch.zeros(4, 3, 8), means=torch.zeros(3, 1, 8),
                whiteners=torch.eye(8).expand(3, 8, 8).contiguous())
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        mahalanobis(**args)


@needs_cpu
def test_native_backend_rejects_other_dtypes():
    feats, means, W = make_problem(3, 2, 5, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        mahalanobis(feats.double(), means, W, backend="cpu")
    with pytest.raises(TypeError, match="must be float32"):
        mahalanobis(feats, means.double(), W, backend="cpu")


@needs_cpu
def test_torch_compile_and_meta():
    feats, means, W = make_problem(9, 3, 10, 2)
    expect = mahalanobis(feats, means, W, backend="cpu")

    def direct(f, m, w):
        return torch.ops.dupfast.mahalanobis(f, m, w, [0, 1, 2], False, True, False) * 2

    compiled = torch.compile(direct, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(feats, means, W), 2 * expect)
    via_api = torch.compile(lambda f: mahalanobis(f, means, W, backend="cpu"), backend="eager")
    assert torch.allclose(via_api(feats), expect)
    meta = mahalanobis(feats.to("meta"), means.to("meta"), W.to("meta"), layers=[1], reduce="none",
                       backend="cpu")
    assert meta.device.type == "meta" and meta.shape == (9, 1, 2) and meta.dtype == torch.float32


@needs_cpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), n_layers=st.integers(1, 4), d=st.integers(1, 140), k=st.integers(1, 3),
       seed=st.integers(0, 2**16), bf16=st.booleans(), reduce=st.sampled_from(["min", "none"]),
       squared=st.booleans(), general_w=st.booleans(), fast=st.booleans(), data=st.data())
def test_cpu_property(n, n_layers, d, k, seed, bf16, reduce, squared, general_w, fast, data):
    layers = data.draw(st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=n_layers + 1))
    feats, means, W = make_problem(n, n_layers, d, k, seed=seed, general_w=general_w,
                                   dtype=torch.bfloat16 if bf16 else torch.float32)
    precision = "bf16" if fast else "fp32"
    out = mahalanobis(feats, means, W, layers=layers, reduce=reduce, squared=squared, backend="cpu",
                      precision=precision)
    if fast:
        assert_within_bf16_bound(out, feats, means, W, layers, reduce, squared, "cpu property bf16")
    else:
        check(out, feats, means, W, layers, reduce, squared, "cpu property")
    assert (out >= 0).all()
    # rows are independent: a permuted batch gives the permuted result
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = mahalanobis(feats[perm], means, W, layers=layers, reduce=reduce, squared=squared, backend="cpu",
                           precision=precision)
    assert torch.allclose(permuted, out[perm], rtol=1e-5, atol=1e-6 * max(1.0, out.abs().max().item()))

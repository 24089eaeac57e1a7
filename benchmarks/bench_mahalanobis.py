"""Multi-layer Mahalanobis, N = 8192, L = 13, d = 768, K = 1 and 2 (issue 4).

    python -m pytest benchmarks/bench_mahalanobis.py --benchmark-only -s --benchmark-min-rounds=3

Reference: the authors' per-layer einsum('bi,ij,bj->b', x - mu, P, x - mu) with P = W W^T formed
before timing (DUP holds P). Reported per run: time (min over rounds), ratio to the reference from
the same run, GFLOP/s against the fp32 GEMM rate measured in the same run (executed flops: with a
lower-triangular W the cpu op skips W's zero blocks; dense-equivalent flops 2 N L d^2 shown too),
and peak extra resident memory of one call (conftest.peak_memory) against the reference's.
"""
import pytest
import torch

from conftest import peak_memory
from dupfast.ops import mahalanobis
from dupfast.ops.mahalanobis import bf16_gemm_pays, mahalanobis_cpu
from dupfast.ops.mahalanobis_reference import mahalanobis_precision_reference

N, L, D = 8192, 13, 768
PANEL = 128  # csrc/mahalanobis_cpu.cpp kPanel, for the executed-flop count
TIMES = {}   # (name, K) -> (min seconds, result), shared between the tests of one run


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(N, L, D, generator=g)
    B = torch.randn(L, D, D, generator=g) / D**0.5
    prec = B @ B.transpose(1, 2) + 0.5 * torch.eye(D)
    W = torch.linalg.cholesky(prec)
    means = {1: 0.5 * torch.randn(L, 1, D, generator=g), 2: 0.5 * torch.randn(L, 2, D, generator=g)}
    return {"feats": feats, "feats_bf16": feats.to(torch.bfloat16), "W": W, "P": W @ W.transpose(1, 2),
            "means": means}


def executed_gflop(lower=True):
    panels = range(0, D, PANEL)
    per_row = sum(2 * (D - j0 if lower else D) * min(PANEL, D - j0) for j0 in panels)
    return N * L * per_row / 1e9


def _run(benchmark, fn):
    result = benchmark(fn)
    return benchmark.stats.stats.min, result


def _reference_time(problem, k):
    if ("reference", k) not in TIMES:  # when the reference bench was deselected
        import time
        fn = lambda: mahalanobis_precision_reference(problem["feats"], problem["means"][k], problem["P"])  # noqa: E731
        t0 = time.perf_counter()
        out = fn()
        TIMES[("reference", k)] = (time.perf_counter() - t0, out)
    return TIMES[("reference", k)]


@pytest.mark.parametrize("k", [1, 2])
def test_reference(benchmark, problem, machine, k):
    fn = lambda: mahalanobis_precision_reference(problem["feats"], problem["means"][k], problem["P"])  # noqa: E731
    _, mem = peak_memory(fn)
    t, out = _run(benchmark, fn)
    TIMES[("reference", k)] = (t, out)
    TIMES[("reference_mem", k)] = mem
    gflops = 2 * N * L * k * D * D / 1e9 / t
    benchmark.extra_info.update(seconds=t, gflops=gflops, peak_extra_mib=mem / 2**20, **machine)
    print(f"\n[maha reference K={k}] {t:.3f} s, {gflops:.1f} GFLOP/s ({100 * gflops / machine['fp32_gemm_gflops']:.0f}% "
          f"of fp32 GEMM), peak extra memory {mem / 2**20:.1f} MiB")


@pytest.mark.parametrize("k", [1, 2])
def test_cpu_fp32(benchmark, problem, machine, k):
    fn = lambda: mahalanobis(problem["feats"], problem["means"][k], problem["W"], backend="cpu")  # noqa: E731
    _, mem = peak_memory(fn)
    t, out = _run(benchmark, fn)
    TIMES[("cpu", k)] = (t, out)
    ref_t, ref_out = _reference_time(problem, k)
    ref_mem = TIMES.get(("reference_mem", k))
    exec_gflops = executed_gflop() / t
    dense_gflops = 2 * N * L * D * D / 1e9 / t
    peak = machine["fp32_gemm_gflops"]
    rel = ((out - ref_out).abs() / ref_out.abs().clamp_min(1e-30)).max().item()
    info = dict(seconds=t, ratio_vs_reference=ref_t / t, executed_gflops=exec_gflops,
                dense_equivalent_gflops=dense_gflops, pct_of_fp32_gemm=100 * exec_gflops / peak,
                peak_extra_mib=mem / 2**20, max_rel_diff_vs_reference=rel, **machine)
    if ref_mem:
        info["memory_fraction_of_reference"] = mem / ref_mem
    benchmark.extra_info.update(info)
    print(f"\n[maha cpu fp32 K={k}] {t:.3f} s = {ref_t / t:.2f}x the reference; executed {exec_gflops:.1f} GFLOP/s "
          f"= {100 * exec_gflops / peak:.0f}% of the fp32 GEMM rate {peak:.1f} (dense-equivalent "
          f"{dense_gflops:.1f} = {100 * dense_gflops / peak:.0f}%); peak extra memory {mem / 2**20:.1f} MiB"
          + (f" = {mem / ref_mem:.3f} of the reference's" if ref_mem else "")
          + f"; max rel diff vs reference {rel:.2e}")


@pytest.mark.parametrize("bf16_gemm", [None, True], ids=["auto", "forced_bf16_gemm"])
@pytest.mark.parametrize("k", [1, 2])
def test_cpu_bf16(benchmark, problem, machine, k, bf16_gemm):
    if bf16_gemm and k == 2:
        pytest.skip("the forced bf16 GEMM path is timed at K = 1 only")
    feats = problem["feats_bf16"]
    fn = lambda: mahalanobis_cpu(feats, problem["means"][k], problem["W"], list(range(L)), "min", False,  # noqa: E731
                                 bf16_gemm=bf16_gemm)
    _, mem = peak_memory(fn)
    t, out = _run(benchmark, fn)
    if ("cpu", k) not in TIMES:
        pytest.skip("run test_cpu_fp32 in the same session for the bf16 / fp32 comparison")
    t32, out32 = TIMES[("cpu", k)]
    rel = ((out - out32).abs() / out32.abs().clamp_min(1e-30)).max().item()
    used = bf16_gemm if bf16_gemm is not None else bf16_gemm_pays()
    benchmark.extra_info.update(seconds=t, speedup_vs_fp32=t32 / t, max_rel_diff_vs_fp32=rel,
                                bf16_gemm=used, peak_extra_mib=mem / 2**20, **machine)
    print(f"\n[maha cpu bf16 K={k} bf16_gemm={used}] {t:.3f} s = {t32 / t:.2f}x the fp32 path; max relative "
          f"difference of the distances vs fp32 features {rel:.2e}; peak extra memory {mem / 2**20:.1f} MiB")

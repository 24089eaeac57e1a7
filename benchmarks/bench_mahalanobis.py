"""Multi-layer Mahalanobis, N = 8192, L = 13, d = 768, K = 1 and 2 (issue 4).

    python -m pytest benchmarks/bench_mahalanobis.py --benchmark-only -s --benchmark-min-rounds=3

Reference: the authors' per-layer einsum('bi,ij,bj->b', x - mu, P, x - mu) with P = W W^T formed
before timing (DUP holds P). Reported per run, all from this run: time (min over rounds; wall and
process CPU time), ratio to the reference, GFLOP/s against the fp32 GEMM rate (wall against wall,
per CPU-second against per CPU-second; executed flops: with a lower-triangular W the cpu op skips
W's zero blocks, dense-equivalent 2 N L d^2 shown too), and peak extra resident memory of one warm
call (conftest.peak_memory) against the reference's. With DUPFAST_BENCH_DEVICE=cuda the problem lives on
the GPU and the cuda and triton backends are timed (test ids keep the backend name); DUPFAST_BENCH_TINY=1
shrinks it to a dry-run shape.
"""
import time

import pytest
import torch

from conftest import CUDA, DEVICE, TINY, measure, native_backends
from dupfast.ops import mahalanobis
from dupfast.ops.mahalanobis import native_bf16_cpu
from dupfast.ops.mahalanobis_reference import mahalanobis_precision_reference

N, L, D = (64, 3, 32) if TINY else (8192, 13, 768)
PANEL = 128  # kPanel of csrc/mahalanobis_cpu.cpp, for the executed-flop count
RUNS = {}    # (name, K) -> dict(wall, cpu, out, mem), shared by the tests of one session


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(N, L, D, generator=g)
    B = torch.randn(L, D, D, generator=g) / D**0.5
    W = torch.linalg.cholesky(B @ B.transpose(1, 2) + 0.5 * torch.eye(D))
    means = {1: 0.5 * torch.randn(L, 1, D, generator=g), 2: 0.5 * torch.randn(L, 2, D, generator=g)}
    out = {"feats": feats, "feats_bf16": feats.to(torch.bfloat16), "W": W, "P": W @ W.transpose(1, 2),
           "means": means}
    return {k: ({kk: vv.to(DEVICE) for kk, vv in v.items()} if isinstance(v, dict) else v.to(DEVICE))
            for k, v in out.items()}


def executed_gflop(backend="cpu"):
    if backend != "cpu":  # the GPU kernels' flop count is not modelled: dense-equivalent
        return 2 * N * L * D * D / 1e9
    per_row = sum(2 * (D - j0) * min(PANEL, D - j0) for j0 in range(0, D, PANEL))
    return N * L * per_row / 1e9


def reference_run(problem, k):
    if ("reference", k) not in RUNS:  # the reference bench was deselected: time one call
        fn = lambda: mahalanobis_precision_reference(problem["feats"], problem["means"][k], problem["P"])  # noqa: E731
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        RUNS[("reference", k)] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "out": out,
                                  "mem": None}
    return RUNS[("reference", k)]


def rates(gflop, run, machine):
    wall, cpu = gflop / run["wall"], gflop / run["cpu"]
    return wall, cpu, 100 * wall / machine["fp32_gemm_gflops"], 100 * cpu / machine["fp32_gemm_gflops_per_cpu_s"]


@pytest.mark.parametrize("k", [1, 2])
def test_reference(benchmark, problem, machine, k):
    run = measure(benchmark, lambda: mahalanobis_precision_reference(problem["feats"], problem["means"][k],
                                                                     problem["P"]))
    RUNS[("reference", k)] = run
    gw, gc, pw, pc = rates(2 * N * L * k * D * D / 1e9, run, machine)
    benchmark.extra_info.update(wall_s=run["wall"], cpu_s=run["cpu"], gflops_wall=gw, gflops_per_cpu_s=gc,
                                peak_extra_mib=run["mem"] / 2**20, **machine)
    print(f"\n[maha reference K={k}] wall {run['wall']:.3f} s, CPU {run['cpu']:.3f} s; {gw:.1f} GFLOP/s = {pw:.0f}% "
          f"of the fp32 GEMM (per CPU-second {gc:.1f} = {pc:.0f}%); peak extra memory {run['mem'] / 2**20:.1f} MiB")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", native_backends())
def test_cpu_fp32(benchmark, problem, machine, k, backend):
    run = measure(benchmark, lambda: mahalanobis(problem["feats"], problem["means"][k], problem["W"], backend=backend))
    RUNS[(backend, k)] = run
    ref = reference_run(problem, k)
    gw, gc, pw, pc = rates(executed_gflop(backend), run, machine)
    dense = 2 * N * L * D * D / 1e9
    rel = ((run["out"] - ref["out"]).abs() / ref["out"].abs().clamp_min(1e-30)).max().item()
    info = dict(wall_s=run["wall"], cpu_s=run["cpu"], ratio_vs_reference_wall=ref["wall"] / run["wall"],
                ratio_vs_reference_cpu=ref["cpu"] / run["cpu"], executed_gflops_wall=gw,
                executed_gflops_per_cpu_s=gc, pct_of_fp32_gemm_wall=pw, pct_of_fp32_gemm_cpu=pc,
                dense_equivalent_gflops_wall=dense / run["wall"], peak_extra_mib=run["mem"] / 2**20,
                max_rel_diff_vs_reference=rel, backend=backend, **machine)
    mem_note = ""
    if ref["mem"]:
        info["memory_fraction_of_reference"] = run["mem"] / ref["mem"]
        mem_note = f" = {run['mem'] / ref['mem']:.3f} of the reference's {ref['mem'] / 2**20:.1f} MiB"
    benchmark.extra_info.update(info)
    print(f"\n[maha {backend} fp32 K={k}] wall {run['wall']:.3f} s = {ref['wall'] / run['wall']:.2f}x faster than the reference "
          f"(CPU time {run['cpu']:.3f} s, {ref['cpu'] / run['cpu']:.2f}x); executed {gw:.1f} GFLOP/s = {pw:.0f}% of the "
          f"fp32 GEMM rate (per CPU-second {gc:.1f} = {pc:.0f}%); dense-equivalent {dense / run['wall']:.1f} GFLOP/s = "
          f"{100 * dense / run['wall'] / machine['fp32_gemm_gflops']:.0f}%; peak extra memory "
          f"{run['mem'] / 2**20:.1f} MiB{mem_note}; max rel diff vs reference {rel:.2e}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"], ids=["default_upcast", "opt_in_bf16"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", native_backends())
def test_cpu_bf16(benchmark, problem, machine, k, precision, backend):
    """bf16 features: the default (exact upcast, fp32 GEMM: same distances as the fp32 path) and the
    opt-in precision="bf16" (bf16 GEMM, cpu backend only), as ratios to the fp32 path timed in the same session."""
    if precision == "bf16" and backend != "cpu":
        pytest.skip("precision='bf16' is a cpu-backend option")
    if (backend, k) not in RUNS:
        pytest.skip("run test_cpu_fp32 in the same session for the bf16 / fp32 comparison")
    feats = problem["feats_bf16"]
    run = measure(benchmark, lambda: mahalanobis(feats, problem["means"][k], problem["W"], backend=backend,
                                                 precision=precision))
    fp32 = RUNS[(backend, k)]
    # the same bf16-valued features through the fp32 path: isolates the op's own error
    exact = mahalanobis(feats.float(), problem["means"][k], problem["W"], backend=backend)
    rel = ((run["out"] - exact).abs() / exact.abs().clamp_min(1e-30))
    benchmark.extra_info.update(wall_s=run["wall"], cpu_s=run["cpu"], speedup_vs_fp32_wall=fp32["wall"] / run["wall"],
                                speedup_vs_fp32_cpu=fp32["cpu"] / run["cpu"], max_rel_diff_vs_fp32=rel.max().item(),
                                median_rel_diff_vs_fp32=rel.median().item(), precision=precision,
                                peak_extra_mib=run["mem"] / 2**20, **machine)
    print(f"\n[maha {backend} bf16 features K={k} precision={precision}, native bf16 {native_bf16_cpu()}] wall "
          f"{run['wall']:.3f} s = {fp32['wall'] / run['wall']:.2f}x the fp32 path (CPU time {fp32['cpu'] / run['cpu']:.2f}x); "
          f"distances vs the fp32 path on the same (bf16-valued) features: max relative difference {rel.max():.2e}, "
          f"median {rel.median():.2e}; torch bf16 mm {machine['bf16_gemm_gflops'] / machine['fp32_gemm_gflops']:.2f}x "
          f"fp32 mm; peak extra memory {run['mem'] / 2**20:.1f} MiB")

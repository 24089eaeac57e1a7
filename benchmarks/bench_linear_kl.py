"""Fused LM head + KL (dupfast.ops.linear_kl_div, the compiled backends) against PyTorch, forward + backward, at
SmolLM2's head: R = 4096 rows, H = 576, V = 49,152, fp32 and bf16, the head frozen (the LoRA case:
gradient w.r.t. hidden only) and trainable (also w.r.t. the weight); and the cached top-k teacher
(teacher_topk, DUPFAST_BENCH_LKL_TOPK slots, default 128) against the recomputed one.

    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_linear_kl.py --benchmark-only -s --benchmark-min-rounds=3
    DUPFAST_BENCH_LKL_ROWS=512 ...     a quick run with fewer rows (the ratios then mean less)
    DUPFAST_BENCH_DEVICE=cuda ...      on the GPU: inputs there, the cuda and triton backends (test ids keep
                                       the backend name; cpu on the CPU), device-synchronised timings,
                                       CUDA peak allocations, the GPU's torch.mm rates (conftest)
    DUPFAST_BENCH_TINY=1 ...           a dry-run shape (R = 64, H = 32, V = 1003, top-16; ratios mean nothing)

PyTorch baseline: logits = hidden @ weight.T -> log_softmax -> F.kl_div(..., log_target=True,
"batchmean") against the teacher's log-probs -> backward. The teacher is the same for both: cached
teacher hidden states and the student's head, its logits recomputed each call without grad (PyTorch:
log_softmax(teacher_hidden @ weight.T) under no_grad; dupfast: teacher_hidden= with the head detached,
recomputed chunk by chunk). Same GEMMs on both sides: 3 (teacher logits, student logits, grad_hidden)
with a frozen head, 4 with a trainable one (+ grad_weight).

Reported per case, all measured in this run (conftest.measure: wall and process-CPU time, min over
rounds; peak extra resident memory of one warm call via conftest.peak_memory; the gradients count for
both): time ratio PyTorch / dupfast, peak memory ratio dupfast / PyTorch, and each side's GFLOP/s of
the head's GEMM work against this machine's torch.mm rate for the dtype (conftest's `machine`), wall
against wall and per CPU-second against per CPU-second (the machines here are shared); and the time of
the step's GEMMs alone as plain torch.mm calls, which bounds what any fused kernel can gain.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, TINY, best_time, measure, native_backends, sync
from dupfast import _ext
from dupfast.ops import linear_kl_div
from dupfast.ops.linear_kl import default_chunk_rows, teacher_topk_cache

ROWS = int(os.environ.get("DUPFAST_BENCH_LKL_ROWS", "64" if TINY else "4096"))
H, V = (32, 1003) if TINY else (576, 49152)
TOPK = min(V, int(os.environ.get("DUPFAST_BENCH_LKL_TOPK", "16" if TINY else "128")))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS = ("frozen", "trainable")
RUNS = {}  # ("torch" or the backend, dtype, head) -> measure()'s dict, shared by the tests of one session

pytestmark = pytest.mark.skipif(not _ext.has_op("linear_kl_div_fused"), reason="compiled extension not built")


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 / H**0.5)  # logits of std ~3
    teacher_hidden = hidden + 0.3 * torch.randn(ROWS, H, generator=g)
    return {name: {"hidden": hidden.to(DEVICE, dt), "weight": weight.to(DEVICE, dt),
                   "teacher_hidden": teacher_hidden.to(DEVICE, dt)}
            for name, dt in DTYPES.items()}


def leaves(p, head):
    return p["hidden"].detach().requires_grad_(), p["weight"].detach().requires_grad_(head == "trainable")


def torch_step(p, head):
    x, w = leaves(p, head)
    with torch.no_grad():
        teacher_log_probs = F.log_softmax(p["teacher_hidden"] @ p["weight"].T, dim=-1)
    loss = F.kl_div(F.log_softmax(x @ w.T, dim=-1), teacher_log_probs, reduction="batchmean", log_target=True)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def dupfast_step(p, head, backend):
    x, w = leaves(p, head)
    loss = linear_kl_div(x, w, p["teacher_hidden"], backend=backend)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def dupfast_topk_step(p, cache, backend):
    x, w = leaves(p, "frozen")
    loss = linear_kl_div(x, w, teacher_topk=cache, backend=backend)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def gemm_only_s(p, head):
    """Wall time of just the head's GEMMs of one step, as plain torch.mm at full R (best of 2): the lower
    bound of both implementations, so torch_time / this is the most any fused kernel could gain here."""
    x, w = p["hidden"], p["weight"]
    logits = torch.empty(ROWS, V, dtype=x.dtype, device=DEVICE)
    gh = torch.empty(ROWS, H, dtype=x.dtype, device=DEVICE)
    gw = torch.empty(V, H, dtype=x.dtype, device=DEVICE)

    def gemms():
        torch.mm(p["teacher_hidden"], w.T, out=logits)
        torch.mm(x, w.T, out=logits)
        torch.mm(logits, w, out=gh)
        if head == "trainable":
            torch.mm(logits.T, x, out=gw)

    return best_time(gemms, 2)  # synchronised on CUDA


def gemm_gflop(head, teacher_gemm=True):
    return ((3 if head == "frozen" else 4) - (0 if teacher_gemm else 1)) * 2 * ROWS * H * V / 1e9


def rates(run, head, machine, dtype):
    peak, peak_cpu = ((machine["fp32_gemm_gflops"], machine["fp32_gemm_gflops_per_cpu_s"]) if dtype == "fp32" else
                      (machine["bf16_gemm_gflops"], None))
    wall = gemm_gflop(head) / run["wall"]
    cpu = gemm_gflop(head) / run["cpu"]
    return wall, cpu, 100 * wall / peak, (100 * cpu / peak_cpu if peak_cpu else None)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_torch(benchmark, problem, machine, dtype, head):
    run = measure(benchmark, lambda: torch_step(problem[dtype], head))
    RUNS[("torch", dtype, head)] = run
    wall, cpu, pct, _ = rates(run, head, machine, dtype)
    benchmark.extra_info.update(rows=ROWS, hidden=H, vocab=V, wall_s=run["wall"], cpu_s=run["cpu"],
                                peak_extra_mib=run["mem"] / 2**20, gflops_wall=wall, gflops_per_cpu_s=cpu,
                                **machine)
    print(f"\nPyTorch linear+KL fwd+bwd R={ROWS} H={H} V={V} {dtype} head {head}: {run['wall']:.3f} s wall, "
          f"{run['cpu']:.3f} CPU-s, peak extra {run['mem'] / 2**20:.0f} MiB, {wall:.1f} GFLOP/s = {pct:.0f}% of "
          f"torch.mm {dtype}")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", native_backends())
def test_dupfast(benchmark, problem, machine, backend, dtype, head):
    p = problem[dtype]
    run = measure(benchmark, lambda: dupfast_step(p, head, backend))
    RUNS[(backend, dtype, head)] = run
    base = RUNS.get(("torch", dtype, head))
    if base is None:  # the baseline was deselected: one call of it, for the ratios and the check
        import time
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = torch_step(p, head)
        sync()
        base = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "out": out, "mem": float("nan")}
    # same loss and gradients (PyTorch's own error in bf16 sets the scale there)
    tol = {"fp32": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=3e-2, atol=1e-3)}[dtype]
    for ours, theirs in zip(run["out"], base["out"]):
        if theirs is not None:
            torch.testing.assert_close(ours.float(), theirs.float(), **tol)
    wall, cpu, pct, pct_cpu = rates(run, head, machine, dtype)
    gemm_s = gemm_only_s(p, head)
    info = {
        "rows": ROWS, "hidden": H, "vocab": V, "dtype": dtype, "head": head, "backend": backend,
        "chunk_rows": default_chunk_rows(ROWS, V),
        "dupfast_wall_s": run["wall"], "dupfast_cpu_s": run["cpu"], "torch_wall_s": base["wall"],
        "torch_cpu_s": base["cpu"], "speedup_wall": base["wall"] / run["wall"], "speedup_cpu": base["cpu"] / run["cpu"],
        "peak_extra_mib_dupfast": run["mem"] / 2**20, "peak_extra_mib_torch": base["mem"] / 2**20,
        "memory_ratio": run["mem"] / base["mem"], "gflops_wall": wall, "gflops_per_cpu_s": cpu,
        "pct_of_gemm_rate_wall": pct, "pct_of_gemm_rate_cpu": pct_cpu, "gemm_only_s": gemm_s,
        "gemm_bound_max_speedup": base["wall"] / gemm_s, "dupfast_over_gemm_only": run["wall"] / gemm_s, **machine,
    }
    benchmark.extra_info.update(info)
    cpu_part = f", {pct_cpu:.0f}% per CPU-second" if pct_cpu is not None else ""
    print(f"\ndupfast linear_kl_div [{backend}] fwd+bwd R={ROWS} H={H} V={V} {dtype} head {head} (chunks of "
          f"{info['chunk_rows']} rows): {run['wall']:.3f} s wall vs PyTorch {base['wall']:.3f} s -> "
          f"{info['speedup_wall']:.2f}x (CPU time {info['speedup_cpu']:.2f}x); peak extra memory "
          f"{info['peak_extra_mib_dupfast']:.0f} MiB vs {info['peak_extra_mib_torch']:.0f} MiB -> "
          f"{info['memory_ratio']:.3f}x; {wall:.1f} GFLOP/s = {pct:.0f}% of torch.mm {dtype} wall{cpu_part}; "
          f"its GEMMs alone (torch.mm, full R) {gemm_s:.3f} s: dupfast = {run['wall'] / gemm_s:.2f}x that, PyTorch "
          f"{base['wall'] / gemm_s:.2f}x (the most any fusion could gain: {base['wall'] / gemm_s:.2f}x); "
          f"load average {os.getloadavg()[0]:.1f}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", native_backends())
def test_dupfast_topk_teacher(benchmark, problem, machine, backend, dtype):
    """The cached top-k teacher (TOPK slots, from the teacher's logits in the same dtype) against the
    recomputed teacher (test_dupfast, frozen head): time, memory, and its error, which is the top-k
    approximation itself (the tail's mass dropped): relative to the recomputed teacher's loss and
    gradient. Building the cache is outside the timing (a cache is built once)."""
    p = problem[dtype]
    with torch.no_grad():
        cache = teacher_topk_cache(p["teacher_hidden"] @ p["weight"].T, TOPK)
        tail = 1 - cache[1].double().exp().sum(-1)  # teacher mass outside the cache, per row
    cache = (cache[0], cache[1].to(p["hidden"].dtype))
    run = measure(benchmark, lambda: dupfast_topk_step(p, cache, backend))
    exact = RUNS.get((backend, dtype, "frozen"))
    exact_out = exact["out"] if exact is not None else dupfast_step(p, "frozen", backend)
    loss_rel = abs(run["out"][0].item() - exact_out[0].item()) / abs(exact_out[0].item())
    grad_rel = ((run["out"][1].float() - exact_out[1].float()).norm() / exact_out[1].float().norm()).item()
    wall, cpu, pct, pct_cpu = rates(run, "frozen", machine, dtype)
    wall = gemm_gflop("frozen", teacher_gemm=False) / run["wall"]
    info = {"rows": ROWS, "hidden": H, "vocab": V, "dtype": dtype, "backend": backend, "topk": TOPK,
            "wall_s": run["wall"], "cpu_s": run["cpu"], "peak_extra_mib": run["mem"] / 2**20,
            "recomputed_wall_s": exact["wall"] if exact else None,
            "speedup_vs_recomputed": exact["wall"] / run["wall"] if exact else None,
            "loss_rel_err_vs_recomputed": loss_rel, "grad_hidden_rel_err_vs_recomputed": grad_rel,
            "teacher_tail_mass_mean": tail.mean().item(), "gflops_wall": wall, **machine}
    benchmark.extra_info.update(info)
    vs = (f"{exact['wall']:.3f} s recomputed -> {exact['wall'] / run['wall']:.2f}x" if exact else "recomputed not run")
    print(f"\ndupfast linear_kl_div [{backend}] fwd+bwd R={ROWS} H={H} V={V} {dtype} head frozen, top-{TOPK} "
          f"teacher cache: "
          f"{run['wall']:.3f} s wall vs {vs}; peak extra memory {run['mem'] / 2**20:.0f} MiB (cache "
          f"{sum(c.numel() * c.element_size() for c in cache) / 2**20:.0f} MiB, not counted); error vs the recomputed "
          f"teacher: loss {loss_rel:.2e} relative, grad_hidden {grad_rel:.2e} relative (norm); teacher mass outside "
          f"the top-{TOPK}: {tail.mean().item():.3f} mean")

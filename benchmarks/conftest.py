"""Shared measurements for the kernel benchmarks: this machine's peaks, taken in the same run.

* fp32 GEMM rate: best of a few square torch.mm calls (MKL on the CPU build), GFLOP/s, per second of
  wall time and per second of process CPU time (all threads). The machines here are shared: when
  other jobs compete for the cores, wall-time rates drop while CPU-time rates mostly hold, so the
  benchmarks report both and compare like with like.
* read bandwidth: best of a few torch.sum over a 256 MiB fp32 tensor, GB/s.
* peak memory of one call: resident-set (RSS) high-water mark above the RSS before the call, from
  /proc/self/status after resetting the mark via /proc/self/clear_refs. tracemalloc cannot see
  torch's allocations and torch has no CPU allocator statistics; to make RSS track live memory,
  glibc is told (mallopt) to serve every allocation >= 64 KiB by mmap while that one call runs, so
  freed buffers leave the resident set at once instead of being reused silently. Timings run with
  the threshold at glibc's dynamic ceiling (32 MiB) instead: with 64 KiB every per-call buffer (an
  op's per-thread blocks, oneDNN's scratchpads) costs an mmap and fresh page faults, which a user's
  process does not pay (it made the opt-in bf16 Mahalanobis path look 1.3x instead of 1.8x faster).

Device: DUPFAST_BENCH_DEVICE=cuda runs the benchmarks on the GPU: inputs on it, the compiled backends
`native_backends()` = cuda and triton (cpu on the CPU), every timed call ends with torch.cuda.synchronize,
peak memory is torch.cuda.max_memory_allocated above the allocation before the call, and `machine`
measures the GPU's fp32 GEMM rate and read bandwidth (CPU time figures equal wall time there).
DUPFAST_BENCH_TINY=1 shrinks every benchmark to a few-millisecond shape (a dry run of the code path:
benchmarks/gpu_check.sh --cpu-dry-run); its ratios mean nothing.
"""
import ctypes
import os
import time

import pytest
import torch

_M_MMAP_THRESHOLD = -3


_MEASURE_THRESHOLD = 64 * 1024
_TIMING_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _set_mmap_threshold(n_bytes):
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, n_bytes))
    except OSError:
        return False


MMAP_PINNED = _set_mmap_threshold(_TIMING_THRESHOLD)
DEVICE = torch.device(os.environ.get("DUPFAST_BENCH_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
TINY = os.environ.get("DUPFAST_BENCH_TINY") == "1"


def native_backends():
    """The compiled backends benchmarked against the reference on DEVICE: cpu, or cuda and triton."""
    return ["cuda", "triton"] if CUDA else ["cpu"]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def synced(fn):
    """fn followed by a device synchronisation (so a timer around it sees the kernels finish)."""
    if not CUDA:
        return fn

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    return call


def _trim_heap():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def best_time(fn, repeats):
    fn = synced(fn)
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_cpu_time(fn, repeats):
    """Smallest process CPU time (summed over threads) of one call (wall time on CUDA)."""
    if CUDA:
        return best_time(fn, repeats)
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn):
    """(result of fn(), bytes of resident memory fn needed above what was resident before it); on CUDA, bytes
    of device memory allocated above what was allocated before it."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak memory needs Linux /proc/self/clear_refs")
    _set_mmap_threshold(_MEASURE_THRESHOLD)
    _trim_heap()  # free heap pages the timings left resident would otherwise be reused unseen
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        out = fn()
        return out, (_status_kib("VmHWM") - before) * 1024
    finally:
        _set_mmap_threshold(_TIMING_THRESHOLD)


def measure(benchmark, fn):
    """Benchmarks fn: wall time (min over rounds), process CPU time (min), the output and the extra
    resident memory of one warm call."""
    cpu = []
    fn = synced(fn)

    def timed():
        c0 = time.process_time()
        out = fn()
        cpu.append(time.process_time() - c0)
        return out

    out = benchmark(timed)
    _, mem = peak_memory(fn)
    wall = benchmark.stats.stats.min
    return {"wall": wall, "cpu": wall if CUDA else min(cpu), "out": out, "mem": mem}


@pytest.fixture(scope="session")
def machine():
    """fp32 GEMM GFLOP/s and read GB/s of this machine (of the GPU with DUPFAST_BENCH_DEVICE=cuda), measured
    now with torch's thread count."""
    n = 256 if TINY else 8192 if CUDA else 3072
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    c = torch.empty(n, n, device=DEVICE)
    gemm_s = best_time(lambda: torch.mm(a, b, out=c), 3)
    gemm_cpu_s = best_cpu_time(lambda: torch.mm(a, b, out=c), 3)
    ab, bb = a.bfloat16(), b.bfloat16()
    cb = torch.empty(n, n, dtype=torch.bfloat16, device=DEVICE)
    bf16_gemm_s = best_time(lambda: torch.mm(ab, bb, out=cb), 3)
    x = torch.ones((1 if TINY else 64 if not CUDA else 1024) * 1024 * 1024, device=DEVICE)
    sum_s = best_time(lambda: x.sum(), 5)
    info = {
        "fp32_gemm_gflops": 2 * n**3 / gemm_s / 1e9,
        "bf16_gemm_gflops": 2 * n**3 / bf16_gemm_s / 1e9,
        "native_bf16": CUDA or bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
        "fp32_gemm_gflops_per_cpu_s": 2 * n**3 / gemm_cpu_s / 1e9,
        "read_gbps": x.numel() * 4 / sum_s / 1e9,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "cpu": _cpu_name(),
        "mmap_threshold_pinned": MMAP_PINNED,
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "tiny": TINY,
    }
    print(f"\nmachine: {info['device']} / {info['cpu']}, {info['threads']} threads, load average {os.getloadavg()[0]:.1f}: fp32 GEMM "
          f"{info['fp32_gemm_gflops']:.1f} GFLOP/s wall, {info['fp32_gemm_gflops_per_cpu_s']:.1f} GFLOP per CPU-second "
          f"(torch.mm {n}^3); bf16 torch.mm {info['bf16_gemm_gflops']:.1f} GFLOP/s = "
          f"{info['bf16_gemm_gflops'] / info['fp32_gemm_gflops']:.2f}x fp32 (native bf16: {info['native_bf16']}); "
          f"read {info['read_gbps']:.1f} GB/s (sum of 256 MiB)")
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"

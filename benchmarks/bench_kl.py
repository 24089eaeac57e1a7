"""Fused KL + gradient (dupfast.ops.kl_div, cpu backend) against PyTorch, forward + backward.

    pytest benchmarks/bench_kl.py --benchmark-only -s        (DUPFAST_BENCH_ROUNDS=5 by default)

PyTorch baseline: F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True, "batchmean") +
autograd, the same loss (T = 1, no weights). Each case prints and stores in extra_info, all measured
in the same run: the time ratio PyTorch / dupfast (medians), the peak extra memory of each and their
ratio, and dupfast's achieved GB/s against this machine's read bandwidth (a big torch.sum).

Peak memory: conftest.peak_memory (resident set above the level before the call, glibc forced to mmap
every allocation >= 64 KiB during that call only; timings run with glibc's usual threshold). The
gradient left in x.grad counts for both. DUPFAST_BENCH_DEVICE=cuda: inputs on the GPU, the cuda and triton
backends, device-synchronised timings and CUDA peak allocations; DUPFAST_BENCH_TINY=1: dry-run shapes.
"""
import gc
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, MMAP_PINNED, TINY, native_backends, peak_memory, synced
from dupfast import _ext
from dupfast.ops import kl_div

ROUNDS = int(os.environ.get("DUPFAST_BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("DUPFAST_BENCH_THREADS", str(min(2, os.cpu_count() or 1))))
CASES = [(8, 64), (32, 2)] if TINY else [(4096, 32000), (16384, 2)]

pytestmark = pytest.mark.skipif(not _ext.has_op("kl_div_fused"), reason="compiled extension not built")


# ---- measurement helpers (peak memory and the mmap threshold: benchmarks/conftest.py) ---------------

def peak_extra_mib(fn, repeats=3):
    """conftest.peak_memory in MiB, median of `repeats` calls (the first call in a process also pages in
    code and allocator state)."""
    peaks = []
    for _ in range(repeats):
        gc.collect()
        out, extra = peak_memory(fn)
        peaks.append(extra / 2**20)
        del out
    return statistics.median(peaks)


def timed(fn, setup, rounds):
    fn = synced(fn)
    times = []
    for _ in range(rounds):
        args = setup()
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return times


def read_bandwidth_gbs(nbytes=512 * 2**20, rounds=5):
    """This machine's read bandwidth now: a float32 torch.sum over nbytes, best of rounds."""
    if TINY:
        nbytes = 4 * 2**20
    x = torch.ones(nbytes // 4, device=DEVICE)
    x.sum()
    best = min(timed(lambda: x.sum(), lambda: (), rounds))
    return nbytes / best / 1e9


# ---- the two implementations ---------------------------------------------------------------------

def dupfast_step(x, t, backend="cpu"):
    loss = kl_div(x, t, backend=backend)
    loss.backward()
    return loss.detach(), x.grad


def torch_step(x, t):
    loss = F.kl_div(F.log_softmax(x, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("rows, vocab", CASES, ids=[f"R{r}xV{v}" for r, v in CASES])
@pytest.mark.parametrize("backend", native_backends())
def test_kl_forward_backward(benchmark, rows, vocab, backend):
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE)
    t = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE)

    def leaf():
        return (s.detach().requires_grad_(), t)

    def ours_step(x, t):
        return dupfast_step(x, t, backend)

    # same loss, same gradient
    ours, theirs = ours_step(*leaf()), torch_step(*leaf())
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-3, atol=1e-9)
    del ours, theirs

    bandwidth = read_bandwidth_gbs()
    torch_times = timed(torch_step, leaf, ROUNDS)
    benchmark.pedantic(synced(ours_step), setup=lambda: (leaf(), {}), rounds=ROUNDS, warmup_rounds=1)
    ours_times = list(benchmark.stats.stats.data)
    mem_ours = peak_extra_mib(lambda: ours_step(*leaf()))
    mem_torch = peak_extra_mib(lambda: torch_step(*leaf()))

    t_ours, t_torch = statistics.median(ours_times), statistics.median(torch_times)
    moved = 3 * rows * vocab * 4 + rows * 4  # read student + teacher, write the gradient, the row losses
    gbs = moved / t_ours / 1e9
    info = {
        "rows": rows, "vocab": vocab, "threads": THREADS, "rounds": ROUNDS, "backend": backend,
        "device": str(DEVICE),
        "dupfast_ms_median": 1e3 * t_ours, "dupfast_ms_min": 1e3 * min(ours_times),
        "torch_ms_median": 1e3 * t_torch, "torch_ms_min": 1e3 * min(torch_times),
        "speedup_median": t_torch / t_ours, "speedup_min": min(torch_times) / min(ours_times),
        "peak_extra_mib_dupfast": mem_ours, "peak_extra_mib_torch": mem_torch,
        "memory_ratio": mem_ours / mem_torch if mem_torch > 0 else float("nan"),
        "mmap_threshold_pinned": MMAP_PINNED,
        "dupfast_gbs": gbs, "read_bandwidth_gbs": bandwidth, "fraction_of_read_bandwidth": gbs / bandwidth,
    }
    benchmark.extra_info.update(info)
    print(f"\nKL fwd+bwd {backend} R={rows} V={vocab} fp32, {THREADS} threads, {ROUNDS} rounds: "
          f"dupfast {info['dupfast_ms_median']:.2f} ms (min {info['dupfast_ms_min']:.2f}), "
          f"PyTorch {info['torch_ms_median']:.2f} ms (min {info['torch_ms_min']:.2f}) -> "
          f"{info['speedup_median']:.2f}x (min/min {info['speedup_min']:.2f}x); "
          f"peak extra memory {mem_ours:.1f} MiB vs {mem_torch:.1f} MiB -> {info['memory_ratio']:.2f}x; "
          f"{gbs:.2f} GB/s = {100 * gbs / bandwidth:.0f}% of the measured read bandwidth {bandwidth:.2f} GB/s")

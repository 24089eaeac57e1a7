"""Layer transitions, N = 8192, L = 13, d = 768, fp32 (issue 4).

    python -m pytest benchmarks/bench_transitions.py --benchmark-only -s --benchmark-min-rounds=3

Reference: dupfast.ops.transitions_reference (bmm Gram, cosines, batched torch.linalg.svdvals of the
explicit [N, L-1, d] differences). Reported from this run: time (min over rounds; wall and process
CPU time), ratio to the reference, the largest differences of cosines and concentration against the
reference, GB/s of feature reads against the read bandwidth measured in the same run, and peak extra
resident memory of one warm call (conftest.peak_memory) against the reference's. DUPFAST_BENCH_DEVICE=cuda:
on the GPU, the cuda and triton backends; DUPFAST_BENCH_TINY=1: a dry-run shape.
"""
import time

import pytest
import torch

from conftest import CUDA, DEVICE, TINY, measure, native_backends
from dupfast.ops import layer_transitions
from dupfast.ops.transitions_reference import layer_transitions_reference

N, L, D = (64, 4, 32) if TINY else (8192, 13, 768)
RUNS = {}


@pytest.fixture(scope="module")
def features():
    g = torch.Generator().manual_seed(0)
    steps = 0.3 * torch.randn(N, L, D, generator=g) + 0.2 * torch.randn(N, 1, D, generator=g)
    return (3.0 * torch.randn(N, 1, D, generator=g) + torch.cumsum(steps, dim=1)).to(DEVICE)


def test_reference(benchmark, features, machine):
    run = measure(benchmark, lambda: layer_transitions_reference(features))
    RUNS["reference"] = run
    benchmark.extra_info.update(wall_s=run["wall"], cpu_s=run["cpu"], peak_extra_mib=run["mem"] / 2**20, **machine)
    print(f"\n[transitions reference] wall {run['wall']:.3f} s, CPU {run['cpu']:.3f} s; peak extra memory "
          f"{run['mem'] / 2**20:.1f} MiB")


@pytest.mark.parametrize("backend", native_backends())
def test_cpu(benchmark, features, machine, backend):
    run = measure(benchmark, lambda: layer_transitions(features, backend=backend))
    if "reference" not in RUNS:
        t0, c0 = time.perf_counter(), time.process_time()
        out = layer_transitions_reference(features)
        if CUDA:
            torch.cuda.synchronize()
        RUNS["reference"] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "out": out,
                             "mem": None}
    ref = RUNS["reference"]
    diffs = {name: (a.double() - b.double()).abs().max().item()
             for name, a, b in zip(("gram", "cosines", "concentration"), run["out"], ref["out"])}
    gram_rel = diffs["gram"] / ref["out"][0].abs().max().item()
    gbps = features.numel() * features.element_size() / run["wall"] / 1e9
    info = dict(wall_s=run["wall"], cpu_s=run["cpu"], ratio_vs_reference_wall=ref["wall"] / run["wall"],
                ratio_vs_reference_cpu=ref["cpu"] / run["cpu"], max_abs_diff_cosines=diffs["cosines"],
                max_abs_diff_concentration=diffs["concentration"], max_rel_diff_gram=gram_rel, achieved_read_gbps=gbps,
                pct_of_read_bandwidth=100 * gbps / machine["read_gbps"], peak_extra_mib=run["mem"] / 2**20,
                backend=backend, **machine)
    mem_note = ""
    if ref["mem"]:
        info["memory_fraction_of_reference"] = run["mem"] / ref["mem"]
        mem_note = f" = {run['mem'] / ref['mem']:.3f} of the reference's {ref['mem'] / 2**20:.1f} MiB"
    benchmark.extra_info.update(info)
    print(f"\n[transitions {backend}] wall {run['wall']:.3f} s = {ref['wall'] / run['wall']:.1f}x faster than the reference "
          f"(CPU time {run['cpu']:.3f} s, {ref['cpu'] / run['cpu']:.1f}x); max |diff| vs reference: cosines "
          f"{diffs['cosines']:.2e}, concentration {diffs['concentration']:.2e}, gram {gram_rel:.2e} relative; "
          f"{gbps:.2f} GB/s of features = {100 * gbps / machine['read_gbps']:.0f}% of the read bandwidth; peak extra "
          f"memory {run['mem'] / 2**20:.1f} MiB{mem_note}")

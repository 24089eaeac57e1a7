"""Token-level multi-layer Mahalanobis on detector-shaped problems (issue 29).

    python -m pytest benchmarks/bench_token_mahalanobis.py --benchmark-only -s --benchmark-min-rounds=5

Problems: the hidden states a detector gets from `output_hidden_states`: L = 13 separate [B, T, d] tensors of a
MiniLM (d = 384) and an MPNet-base (d = 768), B = 32 rows of T = 64 tokens, right-padded to lengths uniform in
[1, T] (about 50% padding, seeded); W lower triangular (a Cholesky factor, as the detector fits); K = 1
(class-agnostic) and K = 2 with a class per row; topk = 3.

Composition (the PyTorch baseline): torch.stack of the layers, (h - mu) @ W over every token ([L, B, T, d]
whitened copy), square-sum, sqrt, pads set to -inf, topk, masked mean and argmax. Fused: `token_mahalanobis`
on the list (backend cpu; cuda and triton with DUPFAST_BENCH_DEVICE=cuda).

Reported per run, all from this run: time (min over rounds; wall and process CPU time), the ratio to the
composition, GFLOP/s against the fp32 GEMM rate the `machine` fixture measures in the same session (wall
against wall, per CPU-second against per CPU-second). Executed flops of the cpu op: valid tokens only, and with
the triangular W the panels skip W's zero blocks (kPanel = 128 of csrc/token_mahalanobis_cpu.cpp); the
composition's: 2 L B T d^2 (all tokens, dense W). Also the peak extra resident memory of one warm call
(conftest.peak_memory) and the largest score difference / argmax disagreement against the composition.
DUPFAST_BENCH_TINY=1 shrinks everything to a dry-run shape (its numbers mean nothing).
"""
import time

import pytest
import torch

from conftest import CUDA, DEVICE, TINY, measure, native_backends
from dupfast.ops import token_mahalanobis

MODELS = {"minilm": 384, "mpnet": 768} if not TINY else {"minilm": 32, "mpnet": 48}
L, B, T = (3, 4, 16) if TINY else (13, 32, 64)
TOPK = 3
PANEL = 128  # kPanel of csrc/token_mahalanobis_cpu.cpp, for the executed-flop count
RUNS = {}    # (name, model, K, dtype) -> dict(wall, cpu, out, mem)


@pytest.fixture(scope="module")
def problems():
    out = {}
    for model, d in MODELS.items():
        g = torch.Generator().manual_seed(d)
        hidden = [torch.randn(B, T, d, generator=g) for _ in range(L)]
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]          # right padding, about 50%
        A = torch.randn(L, d, d, generator=g) / d**0.5
        W = torch.linalg.cholesky(A @ A.transpose(1, 2) + 0.5 * torch.eye(d))
        means = {1: 0.5 * torch.randn(L, 1, d, generator=g), 2: 0.5 * torch.randn(L, 2, d, generator=g)}
        classes = {1: None, 2: torch.randint(0, 2, (B,), generator=g)}
        out[model] = {
            "hidden": {torch.float32: [h.to(DEVICE) for h in hidden],
                       torch.bfloat16: [h.to(DEVICE, torch.bfloat16) for h in hidden]},
            "mask": mask.to(DEVICE), "W": W.to(DEVICE), "d": d,
            "means": {k: v.to(DEVICE) for k, v in means.items()},
            "classes": {k: (None if v is None else v.to(DEVICE)) for k, v in classes.items()},
        }
    return out


def composition(hidden, mask, means, W, classes, topk):
    """The PyTorch composition: stack, whiten every token, square-sum, masked topk / argmax."""
    h = torch.stack(hidden).float()                                       # [L, B, T, d]
    n_layers, n_rows = h.shape[0], h.shape[1]
    mu = means[:, classes] if classes is not None else means[:, :1].expand(n_layers, n_rows, -1)   # [L, B, d]
    c = (h - mu[:, :, None, :]).reshape(n_layers, -1, h.shape[-1])        # [L, B * T, d] centred copy
    y = torch.bmm(c, W)                                                   # [L, B * T, d] whitened copy
    dist = y.square().sum(-1).clamp_min(0).sqrt().reshape(h.shape[:3])    # [L, B, T]
    dist = dist.masked_fill(~mask[None], float("-inf"))
    top = dist.topk(min(topk, dist.shape[-1]), dim=-1).values             # [L, B, k]
    n = mask.sum(1)
    kk = n.clamp(max=topk)
    keep = torch.arange(top.shape[-1], device=top.device)[None, None, :] < kk[None, :, None]
    score = torch.where(keep, top, 0.0).sum(-1) / kk.clamp(min=1)
    argmax = torch.where(n[None] > 0, dist.argmax(-1), -1)                # first maximum: the lowest index
    return score.T, argmax.T


def executed_gflop(p, backend):
    """Flops the cpu op executes: valid tokens x the triangular panels' 2 (d - j0) w per token, per layer."""
    d = p["d"]
    tokens = int(p["mask"].sum()) * L
    if backend != "cpu":   # the GPU kernels' flop count is not modelled: dense over the valid tokens
        return 2 * tokens * d * d / 1e9
    per_token = sum(2 * (d - j0) * min(PANEL, d - j0) for j0 in range(0, d, PANEL))
    return tokens * per_token / 1e9


def rates(gflop, run, machine):
    wall, cpu = gflop / run["wall"], gflop / run["cpu"]
    return wall, cpu, 100 * wall / machine["fp32_gemm_gflops"], 100 * cpu / machine["fp32_gemm_gflops_per_cpu_s"]


def _args(p, k, dtype):
    return p["hidden"][dtype], p["mask"], p["means"][k], p["W"], p["classes"][k]


def composition_run(p, model, k):
    key = ("composition", model, k, torch.float32)
    if key not in RUNS:   # the composition bench was deselected: time one call
        t0, c0 = time.perf_counter(), time.process_time()
        out = composition(*_args(p, k, torch.float32), TOPK)
        if CUDA:
            torch.cuda.synchronize()
        RUNS[key] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "out": out, "mem": None}
    return RUNS[key]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("model", list(MODELS))
def test_composition(benchmark, problems, machine, model, k):
    p = problems[model]
    run = measure(benchmark, lambda: composition(*_args(p, k, torch.float32), TOPK))
    RUNS[("composition", model, k, torch.float32)] = run
    gflop = 2 * L * B * T * p["d"] ** 2 / 1e9
    gw, gc, pw, pc = rates(gflop, run, machine)
    benchmark.extra_info.update(wall_s=run["wall"], cpu_s=run["cpu"], gflops_wall=gw, gflops_per_cpu_s=gc,
                                pct_of_fp32_gemm_wall=pw, pct_of_fp32_gemm_cpu=pc,
                                peak_extra_mib=run["mem"] / 2**20, **machine)
    print(f"\n[token maha composition {model} d={p['d']} K={k}] wall {run['wall'] * 1e3:.2f} ms, CPU "
          f"{run['cpu'] * 1e3:.2f} ms; {gw:.1f} GFLOP/s = {pw:.0f}% of the fp32 GEMM (per CPU-second {gc:.1f} = "
          f"{pc:.0f}%; dense over all {B * T} tokens); peak extra memory {run['mem'] / 2**20:.1f} MiB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("backend", native_backends())
def test_fused(benchmark, problems, machine, backend, model, k, dtype):
    p = problems[model]
    run = measure(benchmark, lambda: token_mahalanobis(*_args(p, k, dtype)[:4], classes=p["classes"][k], topk=TOPK,
                                                       backend=backend))
    RUNS[(backend, model, k, dtype)] = run
    ref = composition_run(p, model, k)
    gw, gc, pw, pc = rates(executed_gflop(p, backend), run, machine)
    valid = p["mask"].sum(1) > 0
    # bf16: against the composition on the same (upcast) values, which composition() does itself
    diff = (run["out"][0] - ref["out"][0]).abs()
    rel = (diff / ref["out"][0].abs().clamp_min(1e-30))[valid].max().item()
    agree = (run["out"][1] == ref["out"][1]).float().mean().item()
    if dtype == torch.bfloat16:   # the composition above ran on the fp32 states: compare with the upcast
        up = composition([h.float() for h in p["hidden"][dtype]], p["mask"], p["means"][k], p["W"], p["classes"][k],
                         TOPK)
        rel = ((run["out"][0] - up[0]).abs() / up[0].abs().clamp_min(1e-30))[valid].max().item()
        agree = (run["out"][1] == up[1]).float().mean().item()
    info = dict(wall_s=run["wall"], cpu_s=run["cpu"], ratio_vs_composition_wall=ref["wall"] / run["wall"],
                ratio_vs_composition_cpu=ref["cpu"] / run["cpu"], executed_gflops_wall=gw,
                executed_gflops_per_cpu_s=gc, pct_of_fp32_gemm_wall=pw, pct_of_fp32_gemm_cpu=pc,
                peak_extra_mib=run["mem"] / 2**20, max_rel_score_diff=rel, argmax_agreement=agree,
                valid_fraction=p["mask"].float().mean().item(), backend=backend, **machine)
    mem_note = ""
    if ref["mem"]:
        info["memory_fraction_of_composition"] = run["mem"] / ref["mem"]
        mem_note = f" = {run['mem'] / ref['mem']:.3f} of the composition's {ref['mem'] / 2**20:.1f} MiB"
    benchmark.extra_info.update(info)
    name = str(dtype).split(".")[-1]
    print(f"\n[token maha {backend} {model} d={p['d']} K={k} {name}] wall {run['wall'] * 1e3:.2f} ms "
          f"= {ref['wall'] / run['wall']:.2f}x the composition (CPU time {run['cpu'] * 1e3:.2f} ms, "
          f"{ref['cpu'] / run['cpu']:.2f}x); executed {gw:.1f} GFLOP/s = {pw:.0f}% of the fp32 GEMM rate (per "
          f"CPU-second {gc:.1f} = {pc:.0f}%; {info['valid_fraction']:.0%} of the tokens valid); peak extra memory "
          f"{run['mem'] / 2**20:.2f} MiB{mem_note}; max rel. score diff vs the composition {rel:.1e}, argmax "
          f"agreement {agree:.3f}")

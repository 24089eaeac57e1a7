"""dupfast.ops.kl_div: every backend on this machine against an independent float64 oracle.

The oracle (oracle_rule.kl_oracle) is the definition written out in float64 (explicit log-softmax,
sum p_T (log p_T - log p_S), torch.autograd for the gradient) on the same (already rounded) inputs: it shares
neither code nor rounding path with any backend, the reference included (Liger #1432). The rule is
oracle_rule.assert_rule: within 2x the error of plain PyTorch with fp32 accumulation (+ a small atol) and
within an absolute fp32-accumulation bound that PyTorch itself must meet, so a kernel (or a reference) that
lost its fp32 accumulation fails even where bf16 PyTorch would be as far off.
"""
import math
import os
import pathlib
import shutil
import subprocess
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dupfast import _ext
from dupfast.ops import available_backends, kl_div, resolve
from oracle_rule import EPS32, assert_rule, kl_bounds, kl_oracle, kl_unit

REPO = pathlib.Path(__file__).resolve().parents[2]
HAS_CPU = _ext.has_op("kl_div_fused")
try:
    import triton  # noqa: F401
    HAS_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
except ImportError:
    HAS_TRITON = False

# The Triton interpreter runs the kernels in numpy, which warns on the -inf - -inf lanes that the
# kernels compute and then discard with tl.where (masked vocabulary slots).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in (subtract|multiply):RuntimeWarning")

needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=f"compiled extension not built ({_ext.load_error()})")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable or no GPU and TRITON_INTERPRET != 1")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


# ---- helpers -------------------------------------------------------------------------------------

def make_inputs(rows, vocab, dtype, seed=0, scale=3.0, masked_row=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    t = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    w = torch.randn(rows, generator=g)  # signed: negative rows are ascent
    if masked_row and rows > 1:
        w[rows // 2] = 0.0
    return s, t, w


def run(backend, s, t, w, temperature, reduction, grad_output=None, teacher_log_probs=False):
    """(loss, grad w.r.t. the student) as float64, from kl_div(..., backend) + autograd."""
    x = s.detach().clone().requires_grad_()
    loss = kl_div(x, t, w, temperature, reduction, teacher_log_probs=teacher_log_probs, backend=backend)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    assert x.grad.dtype == s.dtype
    return loss.detach().double(), x.grad.double()


def oracle(s, t, w, temperature, reduction, grad_output=None):
    """(loss, grad) of the fp64 definition (oracle_rule.kl_oracle), not of any backend."""
    loss, grad, _, _, _ = kl_oracle(s, t, w, temperature, reduction, grad_output)
    return loss, grad


def torch_fp32(s, t, w, temperature, reduction, grad_output=None):
    """Plain PyTorch with fp32 accumulation (16-bit inputs upcast, the gradient back in the student's
    dtype): the baseline of the rule. On fp32 inputs this is the reference backend's own computation, so
    the reference rows are held by the fp32 bound alone (oracle_rule)."""
    x = s.detach().clone().requires_grad_()
    xs = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    tt = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
    log_ps = F.log_softmax(xs / temperature, dim=-1)
    p_t = F.softmax(tt.to(xs.dtype) / temperature, dim=-1)
    rows = torch.where(p_t > 0, F.kl_div(log_ps, p_t, reduction="none"), 0.0).sum(-1)
    if w is not None:
        rows = rows * w.to(xs.dtype)
    loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / s.numel(), "batchmean": rows.sum() / s.shape[0]}
    loss = loss[reduction]
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    return loss.detach().double(), x.grad.double()


def max_abs_logit(s, t, temperature):
    finite = torch.cat([s[torch.isfinite(s)], t[torch.isfinite(t)]]).double()
    return finite.abs().max().item() / temperature if finite.numel() else 0.0


def check_against_oracle(backend, s, t, w, temperature, reduction, grad_output=None):
    loss, grad = run(backend, s, t, w, temperature, reduction, grad_output)
    check_outputs(loss, grad, s, t, w, temperature, reduction, grad_output)


def check_outputs(loss, grad, s, t, w, temperature, reduction, grad_output=None):
    """The rule (oracle_rule.assert_rule) on a backend's (loss, grad) of these inputs."""
    loss64, grad64, p_s, p_t, rows64 = kl_oracle(s, t, w, temperature, reduction, grad_output)
    loss_pt, grad_pt = torch_fp32(s, t, w, temperature, reduction, grad_output)
    assert loss.shape == loss64.shape and grad.shape == grad64.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    y_max = max_abs_logit(s, t, temperature)
    # eps of the relative part: a few fp32 roundings of the scaled logits, where PyTorch happens to be exact
    k = 8 * EPS32 * (1 + y_max)
    rows, vocab = s.shape
    w_abs = torch.ones(rows) if w is None else w.abs().cpu()
    scale = {"none": 1.0, "sum": 1.0, "mean": 1.0 / (rows * vocab), "batchmean": 1.0 / rows}[reduction]
    go = 1.0 if grad_output is None else grad_output.abs().max().item()
    loss_mag = (w_abs.max() if reduction == "none" else w_abs.sum()).item() * scale * go
    grad_mag = w_abs.max().item() * scale * go / temperature
    loss_bound, grad_bound = kl_bounds(kl_unit(y_max, vocab), w, reduction, rows64, p_s, p_t, grad64, grad_output,
                                       temperature, s.dtype)
    assert_rule(loss, loss64, loss_pt, loss_bound, "loss", k * loss_mag)
    assert_rule(grad, grad64, grad_pt, grad_bound, "grad", k * grad_mag)


def torch_bf16(s, t, w, temperature, reduction):
    """Plain PyTorch in bf16 throughout (no upcast): what a kernel that lost its fp32 accumulation returns."""
    x = s.detach().clone().requires_grad_()
    log_ps = F.log_softmax(x / temperature, dim=-1)
    p_t = F.softmax(t.to(x.dtype) / temperature, dim=-1)
    rows = torch.where(p_t > 0, F.kl_div(log_ps, p_t, reduction="none"), 0.0).sum(-1) * w.to(x.dtype)
    loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / s.numel(), "batchmean": rows.sum() / s.shape[0]}
    loss[reduction].backward(torch.ones_like(loss[reduction]))
    return loss[reduction].detach().double(), x.grad.double()


@pytest.mark.parametrize("shape", [(16, 2), (5, 1000)], ids=str)
def test_rule_rejects_bf16_accumulation(shape):
    """The rule is not 2x bf16 PyTorch: bf16 computation throughout (the error a kernel without fp32
    accumulation makes, which the old 2x-same-dtype rule accepted) breaks the fp32 bound."""
    s, t, w = make_inputs(*shape, torch.bfloat16, seed=1)
    with pytest.raises(AssertionError, match="fp32 bound"):
        check_outputs(*torch_bf16(s, t, w, 2.0, "sum"), s, t, w, 2.0, "sum")


# ---- every backend against the oracle ------------------------------------------------------------

SHAPES = [(1, 2), (1, 1), (3, 7), (16, 2), (5, 1000), (4, 2053)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _oracle_cases():
    """Full matrix for reference and cpu; triton (an interpreter here, ~100x slower) gets every
    shape and dtype with one reduction each, rotating, so every reduction is covered."""
    for backend in BACKENDS:
        name = backend if isinstance(backend, str) else backend.values[0]
        marks = () if isinstance(backend, str) else backend.marks
        for i, shape in enumerate(SHAPES):
            for j, dtype in enumerate(DTYPES):
                reductions = REDUCTIONS if name != "triton" else [REDUCTIONS[(i + j) % 4]]
                for reduction in reductions:
                    yield pytest.param(name, dtype, shape, reduction, marks=marks,
                                       id=f"{name}-{dtype}-{shape[0]}x{shape[1]}-{reduction}")


@pytest.mark.parametrize("backend, dtype, shape, reduction", list(_oracle_cases()))
def test_matches_oracle(backend, dtype, shape, reduction):
    s, t, w = make_inputs(*shape, DTYPES[dtype], seed=zlib.crc32(f"{shape}{reduction}".encode()))
    check_against_oracle(backend, s, t, w, 2.0, reduction)


@needs_cpu
@pytest.mark.parametrize("shape", [(7, 1023), (3, 1025), (2, 4097), (2, 152_064), (600, 3), (257, 16), (300, 17)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_block_boundaries_and_llm_vocab(shape, dtype):
    """V around and not a multiple of the CPU block (1024), a Qwen-sized vocabulary, and the
    small-vocabulary path (V <= 16, rows in chunks of 256) with a partial chunk."""
    s, t, w = make_inputs(*shape, dtype, seed=shape[1])
    check_against_oracle("cpu", s, t, w, 1.0, "batchmean")


@needs_triton
def test_triton_several_blocks_with_a_partial_one():
    """BLOCK forced to 512 at V = 2053: four full blocks and a 5-element tail, masked loads."""
    from dupfast.ops import kl_triton
    s, t, w = make_inputs(3, 2053, torch.float32, seed=3)
    loss, grad = kl_triton.launch(s, t, w, 0.5, 1.0, block=512)
    want, want_grad, _, _, _ = kl_oracle(s, t, w, 2.0, "none", torch.ones(3))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_bf16_student_fp32_cached_teacher(backend):
    s, _, w = make_inputs(4, 300, torch.bfloat16, seed=5)
    _, t, _ = make_inputs(4, 300, torch.float32, seed=6)
    check_against_oracle(backend, s, t, w, 1.0, "sum")


@needs_cpu
def test_cpu_fp16():
    s, t, w = make_inputs(6, 777, torch.float16, seed=7)
    check_against_oracle("cpu", s, t, w, 2.0, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperatures(backend, temperature):
    s, t, w = make_inputs(3, 500, torch.float32, seed=11)
    check_against_oracle(backend, s, t, w, temperature, "batchmean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_rows_every_reduction(backend):
    """Three rows at T = 2 worked out by hand: p_S = (1/2, 1/2) against p_T = (3/4, 1/4), w = 1:
    KL = 3/4 log 3 - log 2, gradient w / T (p_S - p_T) = (-1/8, 1/8); a tie (w = 1/2): 0; p_S = (3/4, 1/4)
    against p_T = (1/2, 1/2) with w = -2 (ascent): -2 * 1/2 log(4/3), gradient (-1/4, 1/4)."""
    l3 = 2 * math.log(3.0)  # / T = log 3: softmax(log 3, 0) = (3/4, 1/4)
    s = torch.tensor([[0.0, 0.0], [1.0, 5.0], [l3, 0.0]])
    t = torch.tensor([[l3, 0.0], [1.0, 5.0], [0.0, 0.0]])
    w = torch.tensor([1.0, 0.5, -2.0])
    rows = torch.tensor([0.75 * math.log(3.0) - math.log(2.0), 0.0, -math.log(4.0 / 3.0)], dtype=torch.float64)
    grad_rows = torch.tensor([[-0.125, 0.125], [0.0, 0.0], [-0.25, 0.25]], dtype=torch.float64)
    for reduction, scale in (("none", 1.0), ("sum", 1.0), ("mean", 1 / 6), ("batchmean", 1 / 3)):
        loss, grad = run(backend, s, t, w, 2.0, reduction)
        want = rows if reduction == "none" else rows.sum() * scale
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_rows * scale, rtol=1e-6, atol=1e-7)


# ---- the cases that broke other kernels (style.md §8) ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [2, 9, 1000, 2053])
def test_tie_gives_exactly_zero_loss_and_gradient(backend, dtype, vocab):
    """student == teacher: the state of a freshly initialised LoRA student (B = 0). Liger #1373.
    Includes padded (-inf) vocabulary slots and temperatures != 1."""
    s, _, _ = make_inputs(3, vocab, dtype, seed=vocab)
    if vocab > 2:  # a padded slot
        s[:, -1] = float("-inf")
    for temperature in (1.0, 0.7):
        x = s.clone().requires_grad_()
        loss = kl_div(x, s.clone(), torch.tensor([1.0, -2.0, 0.5]), temperature, "none", backend=backend)
        loss.sum().backward()
        if backend == "reference":  # log_softmax + kl_div rounds: tiny, not exact (why the kernels avoid it)
            assert loss.abs().max() < 1e-5 and x.grad.float().abs().max() < 1e-6
        else:
            assert torch.equal(loss, torch.zeros_like(loss)), loss
            assert torch.equal(x.grad, torch.zeros_like(x.grad)), x.grad.abs().max()


def test_tie_of_a_fresh_lora_student():
    """A LoRA student with B = 0 reproduces the teacher's logits bit for bit: the fused KL gradient
    at step 0 is exactly zero on every backend here."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 5)
    lora_a, lora_b = torch.randn(4, 16, generator=g), torch.zeros(5, 4, requires_grad=True)
    x = torch.randn(8, 16, generator=g)
    teacher = base(x).detach()
    student = base(x) + x @ lora_a.T @ lora_b.T
    assert torch.equal(student, teacher)
    backends = [b for b in available_backends("kl_div") if b != "cuda"]
    assert "reference" in backends
    for backend in backends:
        loss = kl_div(student, teacher, backend=backend)
        (grad_b,) = torch.autograd.grad(loss, lora_b, retain_graph=True)
        if backend == "reference":  # rounding in log_softmax + kl_div: tiny, not exact
            assert grad_b.abs().max() < 1e-6
        else:
            assert torch.equal(grad_b, torch.zeros_like(grad_b)), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", [2.0, -0.5], ids=["x2", "neg"])
def test_grad_output_not_one_and_negative(backend, reduction, scale):
    """Liger's "not last layer" test, plus a negative grad_output (the ascent term); per-row
    grad_output (with signs) for reduction="none" (Liger #678)."""
    s, t, w = make_inputs(6, 333, torch.float32, seed=13)
    if reduction == "none":
        go = torch.linspace(-1.5, 2.0, 6) * scale
    else:
        go = torch.tensor(scale)
    check_against_oracle(backend, s, t, w, 2.0, reduction, grad_output=go)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [5, 400])
def test_masked_rows_give_zero_loss_and_gradient_even_with_garbage(backend, vocab):
    s, t, w = make_inputs(5, vocab, torch.float32, seed=17, masked_row=False)
    w[1] = 0.0
    w[3] = 0.0
    s[1, :3] = float("nan")
    t[1, 4] = float("inf")
    s[3] = float("-inf")  # an all -inf row: not a distribution, but masked
    loss, grad = run(backend, s, t, w, 1.0, "none")
    assert loss[1] == 0 and loss[3] == 0
    assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))
    keep = [0, 2, 4]
    loss64, grad64 = oracle(s[keep], t[keep], w[keep], 1.0, "none")
    torch.testing.assert_close(loss[keep], loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[keep], grad64, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [9, 1500])
def test_negative_infinity_logits(backend, vocab):
    """Masked vocabulary slots (-inf) survive -ffast-math: both masked -> 0; teacher-only -> 0 with
    gradient p_S; student-only where p_T > 0 -> loss +inf, gradient stays finite (-p_T)."""
    s, t, _ = make_inputs(4, vocab, torch.float32, seed=19)
    s[:, ::7] = float("-inf")
    t[:, ::7] = float("-inf")
    t[:, 3::11] = float("-inf")
    w = torch.ones(4)
    loss, grad = run(backend, s, t, w, 1.5, "none")
    loss64, grad64 = oracle(s, t, w, 1.5, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad64, rtol=0, atol=1e-6)
    assert (grad[:, ::7] == 0).all()
    s2 = s.clone()
    s2[0, 5] = float("-inf")  # p_T[0, 5] > 0
    loss, grad = run(backend, s2, t, w, 1.5, "none")
    assert loss[0] == float("inf") and torch.isfinite(loss[1:]).all()
    assert torch.isfinite(grad).all()
    _, grad64 = oracle(s2, t, w, 1.5, "none")
    torch.testing.assert_close(grad, grad64, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_log_probs_are_renormalised_with_temperature(backend):
    """teacher_log_probs=True: p_T = softmax(t / T) -- the same distribution the logits give."""
    s, t, w = make_inputs(3, 600, torch.float32, seed=23)
    log_p = F.log_softmax(t.double(), -1).float()
    for temperature in (1.0, 2.5):
        a = run(backend, s, t, w, temperature, "sum")
        b = run(backend, s, log_p, w, temperature, "sum", teacher_log_probs=True)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    # T = 1, normalised log-probs: torch.nn.KLDivLoss(log_target=True).
    x = s.double().requires_grad_()
    want = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(F.log_softmax(x, -1), log_p.double())
    got = run(backend, s, log_p, None, 1.0, "batchmean", teacher_log_probs=True)[0]
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    # Rounded (bf16) log-probs do not sum to 1; they are re-normalised, not used as exp(t).
    rounded = log_p.to(torch.bfloat16)
    assert abs(rounded.double().exp().sum(-1) - 1).max() > 1e-4
    got = run(backend, s, rounded, None, 1.0, "none", teacher_log_probs=True)
    want = oracle(s, F.log_softmax(rounded.double(), -1), None, 1.0, "none")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_fp64():
    s, t, w = make_inputs(3, 11, torch.float64, seed=29)
    t[0, 2] = float("-inf")
    for reduction in ("none", "batchmean"):  # the other reductions: test_hand_computed_rows_every_reduction
        x = s.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda y: kl_div(y, t, w, 1.7, reduction, backend="reference"), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_rows_sum_to_zero_and_loss_nonnegative(backend):
    s, t, _ = make_inputs(8, 777, torch.float32, seed=31)
    w = torch.rand(8) + 0.1
    loss, grad = run(backend, s, t, w, 1.0, "none")
    assert (loss >= -1e-6).all()
    assert grad.sum(-1).abs().max() < 1e-6


# ---- hypothesis property tests on the cpu backend ------------------------------------------------

@needs_cpu
@settings(max_examples=40, deadline=None)
@example(rows=1, vocab=5, dtype=torch.float32, temperature=4.4375, reduction="none", scale=0.5, seed=4611)
@given(rows=st.integers(1, 9), vocab=st.one_of(st.integers(1, 40), st.integers(1000, 3000)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       temperature=st.floats(0.25, 8.0), reduction=st.sampled_from(REDUCTIONS),
       scale=st.floats(0.1, 20.0), seed=st.integers(0, 2**31 - 1))
def test_cpu_properties(rows, vocab, dtype, temperature, reduction, scale, seed):
    s, t, w = make_inputs(rows, vocab, dtype, seed=seed, scale=scale)
    # 1. the 2x rule against the oracle
    check_against_oracle("cpu", s, t, w, temperature, reduction)
    # 2. a vocabulary permutation permutes the gradient and leaves the loss unchanged (up to the
    #    float32 summation order, and one rounding of the gradient to the student's dtype)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    loss, grad = run("cpu", s, t, w, temperature, "none")
    loss_p, grad_p = run("cpu", s[:, perm], t[:, perm], w, temperature, "none")
    k = 8 * EPS32 * (1 + max(s.abs().max().item(), t.abs().max().item()) / temperature)
    torch.testing.assert_close(loss_p, loss, rtol=0, atol=k * max(1.0, w.abs().max().item()))
    eps, ulp0 = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # ulp0: subnormal step
    # a gradient entry is |w| (p_S - p_T) / T: its rounding scales with the probabilities (|w| / T), not with
    # the difference, which cancels when student and teacher are close (found: rows=1, vocab=5, T=4.4)
    g_scale = max(grad.abs().max().item(), w.abs().max().item() / temperature)
    torch.testing.assert_close(grad_p, grad[:, perm], rtol=0, atol=2 * max(eps, k) * g_scale + ulp0)
    # 3. a tie is exactly zero; 4. each row's gradient sums to ~0; 5. w * KL has w's sign
    tie_loss, tie_grad = run("cpu", s, s.clone(), w, temperature, "none")
    assert torch.equal(tie_loss, torch.zeros_like(tie_loss)) and torch.equal(tie_grad, torch.zeros_like(tie_grad))
    coef = w.abs().max().item() / temperature  # |gradient| <= coef * max(p_S, p_T)
    assert grad.sum(-1).abs().max() <= 8 * max(eps, k) * coef * vocab ** 0.5
    assert (loss * w.double() >= -k * w.double().abs()).all()  # KL >= 0 up to the logits' rounding


# ---- dispatch, torch.compile, meta ---------------------------------------------------------------

@needs_cpu
def test_cpu_backend_is_dispatched_on_cpu(monkeypatch):
    monkeypatch.delenv("DUPFAST_BACKEND", raising=False)
    assert resolve("kl_div", torch.device("cpu"))[0] == "cpu"
    calls = []
    real = torch.ops.dupfast.kl_div_fused
    monkeypatch.setattr(torch.ops.dupfast, "kl_div_fused",
                        lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    s, t, w = make_inputs(2, 10, torch.float32)
    kl_div(s.requires_grad_(), t, w).backward()
    assert calls == [torch.Size([2, 10])]


def test_extension_required_in_ci():
    if os.environ.get("DUPFAST_REQUIRE_EXT") == "1":
        assert HAS_CPU, f"DUPFAST_REQUIRE_EXT=1 but the kl_div_fused op is not built: {_ext.load_error()}"
    else:
        pytest.skip("DUPFAST_REQUIRE_EXT != 1")


def test_float64_goes_to_the_reference_and_fused_backends_refuse_it(monkeypatch):
    monkeypatch.delenv("DUPFAST_BACKEND", raising=False)
    s, t, w = make_inputs(2, 5, torch.float64)
    assert kl_div(s, t, w).dtype == torch.float64
    if HAS_CPU:
        with pytest.raises(TypeError, match="float64"):
            kl_div(s, t, w, backend="cpu")


@needs_cpu
def test_torch_compile_fullgraph():
    s, t, w = make_inputs(4, 300, torch.float32, seed=37)

    def step(x):
        return kl_div(x, t, w, 2.0, "batchmean", backend="cpu")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    (compiled(x1) * -3.0).backward()
    (step(x2) * -3.0).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@needs_cpu
def test_fused_op_on_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    s = torch.empty(3, 7, device="meta", dtype=torch.bfloat16)
    loss, grad = torch.ops.dupfast.kl_div_fused(s, s, None, 1.0, 1.0)
    assert loss.shape == (3,) and loss.dtype == torch.float32 and loss.device.type == "meta"
    assert grad.shape == (3, 7) and grad.dtype == torch.bfloat16
    with FakeTensorMode():
        x = torch.empty(5, 11)
        loss, grad = torch.ops.dupfast.kl_div_fused(x, x, torch.ones(5), 0.5, 0.2)
        assert loss.shape == (5,) and grad.shape == (5, 11)
    out = kl_div(torch.empty(3, 7, device="meta"), torch.empty(3, 7, device="meta"), reduction="none")
    assert out.shape == (3,) and out.device.type == "meta"


@needs_triton
def test_triton_op_has_a_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from dupfast.ops import kl_triton  # noqa: F401  (registers dupfast::kl_div_fused_triton)
    with FakeTensorMode():
        x = torch.empty(5, 11, dtype=torch.bfloat16)
        loss, grad = torch.ops.dupfast.kl_div_fused_triton(x, x, None, 1.0, 1.0)
        assert loss.shape == (5,) and loss.dtype == torch.float32 and grad.dtype == torch.bfloat16


# ---- bad input: clear errors ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(student=torch.zeros(2, 3, 4)), ValueError, "2-D"),
    (dict(teacher=torch.zeros(2, 4)), ValueError, "teacher shape"),
    (dict(student=torch.zeros(0, 3), teacher=torch.zeros(0, 3), weights=torch.zeros(0)), ValueError, "at least one"),
    (dict(student=torch.zeros(2, 3, dtype=torch.long)), TypeError, "floating point"),
    (dict(teacher=torch.zeros(2, 3, requires_grad=True)), ValueError, "teacher must not require grad"),
    (dict(weights=torch.ones(3)), ValueError, r"weights must have shape \[R\]"),
    (dict(weights=torch.ones(2, dtype=torch.long)), TypeError, "weights must be floating"),
    (dict(weights=torch.ones(2, requires_grad=True)), ValueError, "weights must not require grad"),
    (dict(weights=[1.0, 1.0]), TypeError, "weights must be a tensor"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite and > 0"),
    (dict(temperature="2"), TypeError, "temperature must be a float"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(teacher_log_probs=1), TypeError, "teacher_log_probs must be a bool"),
    (dict(backend="nope"), ValueError, "has no 'nope' backend"),
])
def test_bad_input_raises_a_clear_error(kwargs, exc, match):
    args = dict(student=torch.zeros(2, 3), teacher=torch.zeros(2, 3), weights=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kl_div(**args)


@needs_cpu
def test_compiled_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="teacher shape"):
        torch.ops.dupfast.kl_div_fused(torch.zeros(2, 3), torch.zeros(2, 4), None, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="weights must be float32"):
        torch.ops.dupfast.kl_div_fused(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=torch.float64),
                                       1.0, 1.0)


# ---- layer 1 of the CUDA checks: the shared math, built like the extension -----------------------

def test_kl_math_header_on_the_host(tmp_path):
    """csrc/kl_math.h is what the CUDA kernels run (lse_push, lse_merge, kl_elem); build a host driver
    with the extension's flags (-ffast-math included) and run it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / "kl_math_check"
    subprocess.run([cxx, "-O3", "-std=c++20", "-ffast-math", "-fno-math-errno", "-march=x86-64-v3",
                    f"-I{REPO / 'csrc'}", str(REPO / "tests" / "ops" / "kl_math_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "ALL OK" in out.stdout, out.stdout + out.stderr

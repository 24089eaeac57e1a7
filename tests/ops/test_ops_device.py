"""The GPU backends (cuda, triton) on CUDA tensors, against the independent fp64 oracles of the CPU tests
(numpy on the CPU for mahalanobis and transitions, float64 torch on the device for the KL ops) and the fp32
PyTorch baseline run on the same CUDA tensors (tests/ops/oracle_rule.py's rule), at every shape of the CPU
tests plus the benchmark shapes (the Triton shapes the interpreter skips on the CPU run here in full).

Devices: `cuda` when torch sees a GPU; $DUPFAST_OPS_DEVICES (comma list, e.g. "cpu") overrides, so the same
tests can run on the CPU (the cpu backend, and triton under TRITON_INTERPRET=1, on the small shapes only):
`benchmarks/gpu_check.sh --cpu-dry-run` does that. With no device the module is skipped (one skip).

Run on a GPU without the Triton interpreter (tests/conftest.py sets it unless DUPFAST_TEST_GPU=1):

    DUPFAST_TEST_GPU=1 python -m pytest tests/ops/test_ops_device.py
"""
import os
import zlib

import pytest
import torch

from dupfast.ops import _dispatch, layer_transitions, mahalanobis
from dupfast.ops.transitions_reference import layer_transitions_reference
from test_kl import DTYPES as KL_DTYPES, REDUCTIONS, SHAPES as KL_SHAPES, check_against_oracle as kl_check
from test_kl import make_inputs
from test_linear_kl import DTYPES as LKL_DTYPES, SHAPES as LKL_SHAPES, TEACHERS as LKL_TEACHERS
from test_linear_kl import check_against_oracle as lkl_check, make_problem as lkl_problem
from test_mahalanobis import SHAPES as MAHA_SHAPES, TRITON_SHAPES as MAHA_SMALL, check as maha_check
from test_mahalanobis import make_problem
from test_transitions import SHAPES as TRANS_SHAPES, TRITON_SHAPES as TRANS_SMALL, assert_rule as trans_rule
from test_transitions import make_features, oracle as trans_oracle

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in (subtract|multiply):RuntimeWarning")


def _devices():
    given = os.environ.get("DUPFAST_OPS_DEVICES")
    if given:
        return [d for d in given.split(",") if d]
    return ["cuda"] if torch.cuda.is_available() else []


DEVICES = _devices()
if not DEVICES:
    pytest.skip("no CUDA device (set DUPFAST_OPS_DEVICES=cpu to run these tests on the CPU)", allow_module_level=True)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# the README's benchmark shapes, on a real GPU only
MAHA_LARGE = [(8192, 13, 768, 1), (8192, 13, 768, 2), (4099, 7, 384, 3)]
TRANS_LARGE = [(8192, 13, 768), (1025, 25, 1024)]
KL_LARGE = [(4096, 32000), (7, 1023), (3, 1025), (2, 152_064), (600, 3), (257, 16), (300, 17), (16384, 2)]
# linear_kl_div (R, H, V, chunk_rows): SmolLM2's head at the benchmark's R (default chunks: 4096 rows in 7 of
# 592), and with chunks of 1000 rows (a 96-row last chunk)
LKL_LARGE = [(4096, 576, 49152, None), (4096, 576, 49152, 1000)]


def _backends(op, device):
    """The compiled/fused backends that run on `device`: cuda and triton on a GPU; cpu and triton (interpreted)
    on the CPU."""
    have = _dispatch.available_backends(op)
    want = ("cuda", "triton") if device.startswith("cuda") else ("cpu", "triton")
    return [b for b in want if b in have]


def _small(device):
    """On the CPU (and for the Triton interpreter) only the shapes the CPU tests give the interpreter."""
    return not device.startswith("cuda") or INTERPRETED


def _cases(op, shapes, small_shapes, large):
    for device in DEVICES:
        for backend in _backends(op, device):
            pick = [s for s in shapes if s in small_shapes] if _small(device) else list(shapes) + large
            for shape in pick:
                yield pytest.param(device, backend, shape, id=f"{device}-{backend}-" + "x".join(map(str, shape)))


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- mahalanobis ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device, backend, shape", list(_cases("mahalanobis", MAHA_SHAPES, MAHA_SMALL, MAHA_LARGE)))
def test_mahalanobis_on_device(device, backend, shape, dtype):
    n, n_layers, d, k = shape
    feats, means, W = (t.to(device) for t in make_problem(n, n_layers, d, k, seed=n + d, dtype=dtype))
    layers = [n_layers - 1, 0] if n_layers > 1 else None
    for reduce in ("min", "none"):
        for squared in (False, True):
            out = mahalanobis(feats, means, W, layers=layers, reduce=reduce, squared=squared, backend=backend)
            _sync(device)
            assert out.device.type == torch.device(device).type
            maha_check(out, feats, means, W, layers, reduce, squared,
                       f"{device} {backend} {dtype} {shape} {reduce} squared={squared}")


@pytest.mark.parametrize("op", ["mahalanobis", "layer_transitions", "kl_div", "linear_kl_div"])
@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_picks_the_device_backend(op, device):
    """Without a forced backend, a tensor on `device` goes to its compiled kernel (cuda on a GPU, cpu on the
    CPU) when the build has one: on a GPU machine this fails if the extension was built without CUDA."""
    if os.environ.get("DUPFAST_BACKEND"):
        pytest.skip("DUPFAST_BACKEND forces a backend")
    native = "cuda" if device.startswith("cuda") else "cpu"
    name, _ = _dispatch.resolve(op, torch.device(device))
    assert name == native, f"{op} on {device} dispatches to {name}; available: {_dispatch.available_backends(op)}"


# ---- layer transitions ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device, backend, shape",
                         list(_cases("layer_transitions", TRANS_SHAPES, TRANS_SMALL, TRANS_LARGE)))
def test_transitions_on_device(device, backend, shape, dtype):
    if backend == "triton" and INTERPRETED:  # one program per sample, ~1 s each under the interpreter
        shape = (min(shape[0], 3),) + shape[1:]
    feats = make_features(*shape, seed=sum(shape), dtype=dtype).to(device)
    exact = trans_oracle(feats)
    ref = layer_transitions_reference(feats)
    outs = layer_transitions(feats, backend=backend)
    _sync(device)
    assert all(o.device.type == torch.device(device).type for o in outs)
    trans_rule(outs, exact, ref, f"{device} {backend} {dtype} {shape}", features=feats)


# ---- fused KL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(KL_DTYPES))
@pytest.mark.parametrize("device, backend, shape", list(_cases("kl_div", KL_SHAPES, KL_SHAPES[:4], KL_LARGE)))
def test_kl_on_device(device, backend, shape, dtype):
    reductions = REDUCTIONS if not (backend == "triton" and INTERPRETED) else [REDUCTIONS[sum(shape) % 4]]
    for reduction in reductions:
        s, t, w = (x.to(device) for x in make_inputs(*shape, KL_DTYPES[dtype],
                                                     seed=zlib.crc32(f"{shape}{reduction}".encode())))
        try:
            kl_check(backend, s, t, w, 2.0, reduction)  # its loss and gradient are on `device` (run())
        except AssertionError as e:
            raise AssertionError(f"{device} {backend} {dtype} {shape} {reduction}: {e}") from e
        _sync(device)


# ---- fused LM head + KL -------------------------------------------------------------------------

def _lkl_to(p, device):
    """test_linear_kl.make_problem's dict with every tensor (the top-k cache's pair too) on `device`."""
    return {k: (None if v is None else tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device))
            for k, v in p.items()}


def _lkl_cases():
    """cuda + triton on a GPU: every shape of test_linear_kl.py plus LKL_LARGE (the large ones on a real GPU
    only); on the CPU (cpu + the Triton interpreter) the first four (R = 1, V = 1 and 7, chunks of 2 and 4
    rows that divide neither R = 3 nor 9, V = 1003)."""
    for device in DEVICES:
        for backend in _backends("linear_kl_div", device):
            small = _small(device)
            for shape in LKL_SHAPES[:4] if small else LKL_SHAPES:
                yield pytest.param(device, backend, shape, id=f"{device}-{backend}-" + "x".join(map(str, shape[:3]))
                                   + f"-c{shape[3]}")
            if not small:
                for shape in LKL_LARGE:
                    yield pytest.param(device, backend, shape, id=f"{device}-{backend}-smollm2-" + "x".join(
                        map(str, shape[:3])) + f"-c{shape[3]}", marks=[pytest.mark.gpu, pytest.mark.skipif(
                            not torch.cuda.is_available() or INTERPRETED, reason="the SmolLM2 shape: a real GPU only")])


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("dtype", list(LKL_DTYPES))
@pytest.mark.parametrize("device, backend, shape", list(_lkl_cases()))
def test_linear_kl_on_device(device, backend, shape, dtype, head):
    """linear_kl_div on `device` tensors against the fp64 oracle and plain PyTorch with an fp32 KL on the same
    tensors (test_linear_kl.check_against_oracle: its rule, bounds and atols), loss and the
    gradients (hidden; + weight and bias with a trainable head); signed row weights with a masked row
    (make_problem). Each reduction takes another teacher form (recomputed with the student's head, its own
    head, cached logits, the top-k cache) and bias on/off; the Triton interpreter runs one reduction per
    case (rotating), the SmolLM2 shape two (batchmean and none, the recomputed teacher)."""
    rows, h, vocab, chunk = shape
    large = shape in LKL_LARGE
    reductions = list(enumerate(REDUCTIONS))
    if large:  # batchmean (the training loss) and none (a trainable head reruns the chunks in backward)
        reductions = [(0, "batchmean"), (3, "none")]
    elif backend == "triton" and INTERPRETED:  # one reduction, rotating over the shapes, dtypes and heads
        reductions = [reductions[(sum(shape[:3]) + list(LKL_DTYPES).index(dtype) + 2 * (head == "frozen")) % 4]]
    train = ("hidden",) if head == "frozen" else ("hidden", "weight", "bias")
    for k, reduction in reductions:
        teacher = "hidden" if large else LKL_TEACHERS[k]
        bias = (k + rows) % 2 == 0
        p = lkl_problem(rows, h, vocab, LKL_DTYPES[dtype], seed=zlib.crc32(f"{shape}{reduction}{teacher}".encode()),
                        bias=bias, teacher=teacher)
        w = p["weights"]  # signed, row R // 2 masked (w = 0) when R > 1: make sure of an ascent row too
        if rows > 2 and not (w < 0).any():
            w[0] = -w[0]
        p = _lkl_to(p, device)
        what = f"{device} {backend} {dtype} {shape} {head} {reduction} teacher={teacher} bias={bias}"
        try:
            lkl_check(backend, p, 2.0, reduction, train=train, chunk_rows=chunk)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from e
        _sync(device)


# ---- the whole detection on the device -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["default", "dup"])
@pytest.mark.parametrize("device", DEVICES)
def test_detect_on_device_matches_cpu(device, mode):
    """dupfast.detect with the model on `device` (capture, statistics, the device kernels through the
    dispatch) flags what the same detection on the CPU flags, scores within float32 rounding."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import dupfast
    from tiny_models import sentiment_samples, tiny_classifier

    model, tok = tiny_classifier("bert", seed=0)
    clean = sentiment_samples(120, seed=1)
    pool = [s.text + (" cf" if i % 3 == 0 else "") for i, s in enumerate(sentiment_samples(60, seed=2))]
    run = lambda m: dupfast.detect_texts(m, tok, pool, [s.text for s in clean], [s.label for s in clean],  # noqa: E731
                                         mode=mode, batch_size=16)
    ref = run(model)
    got = run(model.to(device))
    _sync(device)
    scale = ref.scores.abs().max().item()
    assert (got.scores.cpu() - ref.scores).abs().max().item() <= 1e-4 * scale
    assert got.threshold == pytest.approx(ref.threshold, rel=1e-4, abs=1e-6)
    close = (ref.scores - ref.threshold).abs() <= 1e-4 * scale  # a flag may only differ at the threshold
    assert torch.equal(got.flags.cpu()[~close], ref.flags[~close])

"""dupfast.ops.layer_transitions: every available backend against an independent fp64 oracle.

The oracle is the definition in numpy float64 written here (H H^T, cosines from the norms, numpy's SVD of the
consecutive differences), not the reference backend, which is held to it like the kernels. Rule
(oracle_rule.assert_rule): a backend's error vs the oracle is at most 2x the error of the fp32 PyTorch
reference (batched svdvals of the explicit differences) plus a small atol, and within an absolute fp32 bound
(fp32_bounds) that the PyTorch reference must meet too.
"""
import os

import numpy as np
import oracle_rule
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dupfast import _ext
from dupfast.ops import _dispatch, layer_transitions
from dupfast.ops.transitions_reference import layer_transitions_reference

HAS_CPU = _ext.has_op("layer_transitions")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="dupfast._C with the layer_transitions op is not built")
HAS_TRITON = "triton" in _dispatch.available_backends("layer_transitions")
NAMES = ("gram", "cosines", "concentration")
EPS32 = oracle_rule.EPS32


def make_features(n, n_layers, d, seed=0, dtype=torch.float32, step=0.3):
    """A residual-stream-like trajectory: each layer adds a small update to the previous one, so
    consecutive layers are close (the cancellation case for K built from G)."""
    g = torch.Generator().manual_seed(seed)
    h0 = 3.0 * torch.randn(n, 1, d, generator=g)
    steps = step * torch.randn(n, n_layers - 1, d, generator=g)
    drift = step * torch.randn(n, 1, d, generator=g)            # a shared direction: sigma_1 dominates
    h = torch.cat([h0, h0 + torch.cumsum(steps + drift, dim=1)], dim=1)
    return h.to(dtype)


def oracle(features):
    """(gram, cosines, concentration) in numpy float64 from the definitions: cosines 0 where a norm is 0,
    concentration sigma_1 / sum(sigma) of the [L-1, d] differences (0 when all sigma are 0), NaN cosines and
    concentration for a sample with a non-finite feature."""
    h = features.detach().cpu().double().numpy()
    finite = np.isfinite(h).reshape(len(h), -1).all(1)
    gram = h @ h.transpose(0, 2, 1)
    norms = np.linalg.norm(h, axis=2)
    denom = norms[:, :-1] * norms[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, (h[:, :-1] * h[:, 1:]).sum(2) / denom, 0.0)
    conc = np.zeros(len(h))
    for i in np.flatnonzero(finite):
        sigma = np.linalg.svd(np.diff(h[i], axis=0), compute_uv=False)
        conc[i] = sigma[0] / sigma.sum() if sigma.sum() > 0 else 0.0
    cos[~finite], conc[~finite] = np.nan, np.nan
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in (gram, cos, conc))


def fp32_bounds(features, c=8.0):
    """Absolute fp32 error bounds of (gram, cosines, concentration), per entry:
    gram: c (sqrt(d) + 2) eps32 sum_k |h_ik||h_jk|; cosines: c (sqrt(d) + 4) eps32; concentration: the
    differences rounded once and an fp32 SVD, c L (sqrt(d) + 2) eps32 sigma_1 / sum(sigma) <= that, plus the
    kernels' eigenvalue route (eigen_route_atol, per sample). bf16 rounding anywhere (2^-8) exceeds them.
    (numpy: torch's 2-thread fp64 GEMMs spin-wait on a busy 2-core machine.)"""
    h = np.abs(features.detach().cpu().double().numpy())
    n, n_layers, d = h.shape
    root = d ** 0.5
    gram = c * (root + 2) * EPS32 * (h @ h.transpose(0, 2, 1))
    cos = np.full((n, n_layers - 1), c * (root + 4) * EPS32)
    conc = c * n_layers * (root + 2) * EPS32 + eigen_route_atol(features, per_sample=True)
    return tuple(torch.from_numpy(np.ascontiguousarray(b)) for b in (gram, cos, conc))


def eigen_route_atol(features, per_sample=False):
    """The kernels take singular values as sqrt of eigenvalues of K = D G D^T with G in float64. An eigenvalue
    carries an absolute error ~ eps64 * |h|^2 (the scale of G, not of the differences), which sqrt turns into
    ~ sqrt(eps64) * |h| on each of the L - 1 singular values: visible in the concentration where the
    differences are tiny next to the features (a residual stream that barely moves) and K is rank deficient."""
    h = features.detach().cpu().double().numpy()
    h = np.where(np.isfinite(h), h, 0.0)
    total = np.linalg.svd(np.diff(h, axis=1), compute_uv=False).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        worst = (h.shape[1] - 1) * np.finfo(np.float64).eps ** 0.5 * np.linalg.norm(h, axis=2).max(1) / total
    worst = np.where(total > 0, worst, 0.0)
    if per_sample:
        return worst
    return float(worst.max()) if len(worst) else 0.0


def assert_rule(outs, exact, ref, what, atol=(1e-5, 1e-6, 1e-6), features=None):
    """oracle_rule.assert_rule on each output (the gram's atol scaled to it) with fp32_bounds(features)."""
    bounds = fp32_bounds(features)
    for name, o, e, r, a, b in zip(NAMES, outs, exact, ref, atol, bounds):
        assert o.dtype == torch.float32, f"{what} {name} dtype {o.dtype}"
        assert o.shape == e.shape, f"{what} {name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        if name == "concentration":
            a = a + eigen_route_atol(features)
        scale = max(1.0, e.abs().max().item()) if name == "gram" and e.numel() else 1.0
        if o.numel():
            oracle_rule.assert_rule(o, e, r, b, f"{what} {name}", a * scale)


def backends():
    """Every backend this build can run here (cuda has its own GPU tests)."""
    return [b for b in _dispatch.available_backends("layer_transitions") if b != "cuda"]


# (N, L, d): L = 2, d = 1, odd N, d not a multiple of the 4-wide fp64 vectors, L over a Jacobi of 12x12
SHAPES = [(1, 2, 1), (5, 2, 7), (9, 3, 1), (7, 5, 33), (3, 13, 40), (21, 6, 130), (4, 36, 50)]
TRITON_SHAPES = {(1, 2, 1), (5, 2, 7), (9, 3, 1), (7, 5, 33)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_L{}_d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backends())
def test_backend_matches_oracle(backend, dtype, shape):
    if backend == "triton" and shape not in TRITON_SHAPES:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    if backend == "triton":  # one program per sample, ~1 s each under the interpreter
        shape = (min(shape[0], 3),) + shape[1:]
    feats = make_features(*shape, seed=sum(shape), dtype=dtype)
    exact = oracle(feats)
    ref = layer_transitions_reference(feats)
    outs = layer_transitions(feats, backend=backend)
    assert_rule(outs, exact, ref, f"{backend} {dtype} {shape}", features=feats)


def test_oracle_matches_eigen_route_and_the_fp64_reference():
    """The oracle (numpy SVD of the differences) equals the G -> K -> eigenvalue route in exact arithmetic,
    and the reference backend run on fp64 inputs equals it."""
    h = make_features(6, 7, 20, seed=1).double()
    gram, cos, conc = oracle(h)
    for mine, theirs in zip((gram, cos, conc), layer_transitions_reference(h)):
        assert torch.allclose(theirs, mine, rtol=1e-12, atol=1e-12)
    G = h @ h.transpose(1, 2)
    Dm = torch.diff(torch.eye(7, dtype=torch.float64), dim=0)
    sig = torch.linalg.eigvalsh(Dm @ G @ Dm.T).clamp_min(0).sqrt()
    assert torch.allclose(conc, sig.max(1).values / sig.sum(1), atol=1e-10)
    gcos = G.diagonal(offset=1, dim1=1, dim2=2) / (G.diagonal(dim1=1, dim2=2)[:, :-1]
                                                   * G.diagonal(dim1=1, dim2=2)[:, 1:]).sqrt()
    assert torch.allclose(cos, gcos, atol=1e-12)


@pytest.mark.parametrize("backend", backends())
def test_degenerate_samples(backend):
    """Zero features, identical layers, a zero layer, rank-1 movement, d = 1 and L = 2."""
    d, n_layers = 6, 4
    feats = torch.randn(5, n_layers, d, generator=torch.Generator().manual_seed(0))
    feats[0] = 0                                                   # nothing at all
    feats[1] = feats[1, :1]                                        # no movement between layers
    feats[2, 2] = 0                                                # one zero layer
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1))
    feats[3] = feats[3, :1] + torch.tensor([0.0, 1.0, -2.0, 0.5])[:, None] * direction   # rank-1 moves
    gram, cos, conc = layer_transitions(feats, backend=backend)
    assert torch.all(cos[0] == 0) and conc[0] == 0
    assert torch.allclose(cos[1], torch.ones(n_layers - 1)) and conc[1] == 0
    assert cos[2, 1] == 0 and cos[2, 2] == 0
    assert abs(conc[3].item() - 1.0) < 1e-6
    assert torch.allclose(gram[4], feats[4] @ feats[4].T, rtol=1e-5, atol=1e-5)
    # d = 1: the differences are one column, so sigma = (|delta|, 0, ...) and the concentration is 1
    _, _, conc1 = layer_transitions(torch.tensor([[[1.0], [3.0], [2.0]], [[2.0], [2.0], [2.0]]]), backend=backend)
    assert abs(conc1[0].item() - 1.0) < 1e-6 and conc1[1] == 0
    # L = 2: one difference, concentration 1 unless it is zero; cosine of two vectors
    two = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [2.0, 2.0]]])
    _, cos2, conc2 = layer_transitions(two, backend=backend)
    assert torch.allclose(cos2, torch.tensor([[0.0], [1.0]]), atol=1e-6)
    assert torch.allclose(conc2, torch.ones(2))


@pytest.mark.parametrize("backend", backends())
def test_nonfinite_sample_gives_nan_and_leaves_others(backend):
    feats = make_features(4, 5, 9, seed=2)
    feats[1, 3, 2] = float("nan")
    feats[2, 0, 0] = float("inf")
    gram, cos, conc = layer_transitions(feats, backend=backend)
    for i in (1, 2):
        assert torch.isnan(conc[i]) and torch.isnan(cos[i]).all()
    exact = oracle(feats)
    for i in (0, 3):
        assert abs(conc[i].item() - exact[2][i].item()) < 1e-5
        assert torch.allclose(cos[i].double(), exact[1][i], atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_nearly_identical_consecutive_layers(backend):
    """K is formed by cancellation when consecutive layers are close: |h| ~ 30, steps ~ 1e-3."""
    feats = make_features(3 if backend == "triton" else 16, 5, 64, seed=4, step=1e-3) * 10
    exact = oracle(feats)
    _, _, conc = layer_transitions(feats, backend=backend)
    assert (conc.double() - exact[2]).abs().max() < 1e-4


@pytest.mark.skipif(not HAS_CPU, reason="needs the cpu backend")
def test_cpu_is_dispatched_on_cpu():
    if os.environ.get("DUPFAST_BACKEND"):
        pytest.skip("DUPFAST_BACKEND forces a backend")
    assert _dispatch.resolve("layer_transitions", torch.device("cpu"))[0] == "cpu"


@needs_cpu
def test_cpu_strided_features_and_empty():
    feats = make_features(10, 4, 12, seed=5)
    wide = torch.zeros(10, 6, 12)
    wide[:, 2:] = feats
    base = layer_transitions(feats, backend="cpu")
    for variant in (wide[:, 2:], feats.transpose(1, 2).contiguous().transpose(1, 2)):
        for a, b in zip(layer_transitions(variant, backend="cpu"), base):
            assert torch.equal(a, b)
    empty = layer_transitions(feats[:0], backend="cpu")
    assert [tuple(t.shape) for t in empty] == [(0, 4, 4), (0, 3), (0,)]


@pytest.mark.parametrize("features, exc, match", [
    (torch.zeros(4, 8), ValueError, r"\[N, L, d\]"),
    (torch.zeros(4, 1, 8), ValueError, "at least 2 layers"),
    (torch.zeros(4, 3, 0), ValueError, "d = 0"),
    (torch.zeros(4, 3, 8, dtype=torch.int64), TypeError, "floating-point"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_arguments(features, exc, match):
    with pytest.raises(exc, match=match):
        layer_transitions(features)


@needs_cpu
def test_native_backend_rejects_fp64():
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        layer_transitions(torch.zeros(2, 3, 4, dtype=torch.float64), backend="cpu")


@needs_cpu
def test_torch_compile_and_meta():
    feats = make_features(6, 4, 10, seed=6)
    expect = layer_transitions(feats, backend="cpu")

    def direct(f):
        g, c, s = torch.ops.dupfast.layer_transitions(f)
        return g.sum(dim=(1, 2)), c * 2, s + 1

    g, c, s = torch.compile(direct, backend="aot_eager", fullgraph=True)(feats)
    assert torch.allclose(g, expect[0].sum(dim=(1, 2))) and torch.allclose(c, 2 * expect[1])
    assert torch.allclose(s, expect[2] + 1)
    meta = layer_transitions(feats.to("meta"), backend="cpu")
    assert [tuple(t.shape) for t in meta] == [(6, 4, 4), (6, 3), (6,)]
    assert all(t.device.type == "meta" for t in meta)


@needs_cpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), n_layers=st.integers(2, 20), d=st.integers(1, 70), seed=st.integers(0, 2**16),
       bf16=st.booleans(), step=st.sampled_from([1e-2, 0.3, 3.0]), scale=st.sampled_from([1e-3, 1.0, 1e3]))
@example(n=7, n_layers=11, d=3, seed=0, bf16=False, step=1e-2, scale=1e-3)  # found: 1.6e-6 over the flat 1e-6
def test_cpu_property(n, n_layers, d, seed, bf16, step, scale):
    feats = (make_features(n, n_layers, d, seed=seed, step=step) * scale).to(
        torch.bfloat16 if bf16 else torch.float32)
    exact = oracle(feats)
    outs = layer_transitions(feats, backend="cpu")
    assert_rule(outs, exact, layer_transitions_reference(feats), "cpu property", features=feats)
    gram, cos, conc = outs
    assert torch.equal(gram, gram.transpose(1, 2))
    assert ((conc >= 0) & (conc <= 1 + 1e-6)).all() and (cos.abs() <= 1).all()
    # the concentration is scale free
    _, _, conc2 = layer_transitions(feats.float() * 4, backend="cpu")
    assert torch.allclose(conc2, conc, atol=1e-6)

"""Multi-layer Mahalanobis distances, one call for all (selected) layers.

    mahalanobis(features [N, L, d], means [L, K, d], whiteners [L, d, d],
                layers=None, reduce="min", squared=False, backend=None, precision="fp32")
        -> [N, L'] (reduce="min": min over the K means) or [N, L', K] (reduce="none"), float32

whiteners[l] is a factor W of layer l's precision, P = W W^T (the lower Cholesky factor in dupfast's
detector), so q = ||(x - mu) W||^2; the output is sqrt(max(q, 0)), or q itself when squared=True.
features may be float32 or bfloat16 (upcast, fp32 accumulation); means and whiteners are float32.

precision="fp32" (the default, on every backend and every CPU): bf16 features are upcast exactly and
everything after that is fp32, so a bf16 input gives the same distances as its fp32 upcast (bit for bit
on the cpu backend). The default never depends on what the CPU can do.

precision="bf16" (opt-in, cpu backend and the reference's emulation only): the centred block x - mu0, W
and the GEMM's output are rounded to bf16, the products accumulated in fp32; on a CPU with native bf16
dot products (AVX512-BF16 or AMX) torch's bf16 GEMM runs at about twice the fp32 rate. Its error bound,
per row and mean (u = 2^-8, the bf16 unit roundoff; y = (x - mu0) W, s_k = (mu_k - mu0) W):

    |y^_j - y_j| <= e_j = (3u + 3u^2 + d * eps32) * sum_i |x_i - mu0_i| |W_ij|   (c, W, output rounding)
    |q^_k - q_k| <= sum_j (2 |y_j - s_kj| e_j + e_j^2) + 2 d eps32 q_k           (fp32 epilogue)

(`bf16_error_bound` computes it in fp64; the tests hold the op to it). On detector-shaped problems at
d = 384..768 the measured error is far below the bound (README: the kernel table).

Backends (dupfast.ops._dispatch): reference (mahalanobis_reference.py), cpu (csrc/mahalanobis_cpu.cpp),
triton (mahalanobis_triton.py), cuda (csrc/cuda/mahalanobis_kernel.cu). The native ones never hold
more than one row block of centred features; with K > 1 they do one GEMM per block for all K means
(centred at the means' centroid, see csrc/mahalanobis_math.h for the cancellation argument).
No gradient is defined (detection scores only).
"""
import torch

from . import mahalanobis_triton
from ._dispatch import register_op, resolve
from .mahalanobis_reference import mahalanobis_bf16_reference, mahalanobis_reference

OP = "mahalanobis"
_REDUCTIONS = ("min", "none")


_PRECISIONS = ("fp32", "bf16")
_BF16_BACKENDS = ("cpu", "reference")


def mahalanobis(features, means, whiteners, layers=None, reduce="min", squared=False, backend=None,
                precision="fp32"):
    """Distances of every sample to the per-layer means under the per-layer precision W W^T."""
    layers = _check_args(features, means, whiteners, layers, reduce, squared)
    if precision not in _PRECISIONS:
        raise ValueError(f"mahalanobis: precision must be one of {_PRECISIONS}, got {precision!r}")
    name, fn = resolve(OP, features.device, backend)
    if precision == "fp32":
        return fn(features, means, whiteners, layers, reduce, bool(squared))
    if name not in _BF16_BACKENDS:
        raise ValueError(f"mahalanobis: precision='bf16' is implemented by the {' and '.join(_BF16_BACKENDS)} "
                         f"backends, not {name!r}; use precision='fp32'")
    if name == "reference":
        return mahalanobis_bf16_reference(features, means, whiteners, layers, reduce, bool(squared))
    return mahalanobis_cpu(features, means, whiteners, layers, reduce, bool(squared), bf16_gemm=True)


def _check_args(features, means, whiteners, layers, reduce, squared):
    """Validates the arguments and returns the layer indices as a list of non-negative ints."""
    for name, t in (("features", features), ("means", means), ("whiteners", whiteners)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mahalanobis: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"mahalanobis: {name} must be a floating-point tensor, got {t.dtype}")
    if features.dim() != 3:
        raise ValueError(f"mahalanobis: features must be [N, L, d], got shape {tuple(features.shape)}")
    n_layers, d = features.shape[1], features.shape[2]
    if means.dim() != 3 or means.shape[0] != n_layers or means.shape[2] != d:
        raise ValueError(f"mahalanobis: means must be [L, K, d] = [{n_layers}, K, {d}] to match features "
                         f"{tuple(features.shape)}, got {tuple(means.shape)} (for one mean per layer use "
                         "means.unsqueeze(1))")
    if means.shape[1] == 0:
        raise ValueError("mahalanobis: means has K = 0 means per layer")
    if tuple(whiteners.shape) != (n_layers, d, d):
        raise ValueError(f"mahalanobis: whiteners must be [L, d, d] = [{n_layers}, {d}, {d}], got "
                         f"{tuple(whiteners.shape)}")
    if d == 0 or n_layers == 0:
        raise ValueError(f"mahalanobis: features has no layers or no dimensions: {tuple(features.shape)}")
    if not (features.device == means.device == whiteners.device):
        raise ValueError(f"mahalanobis: tensors on different devices: features {features.device}, means "
                         f"{means.device}, whiteners {whiteners.device}")
    if reduce not in _REDUCTIONS:
        raise ValueError(f"mahalanobis: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if not isinstance(squared, bool):
        raise TypeError(f"mahalanobis: squared must be a bool, got {type(squared).__name__}")
    return _layer_indices(layers, n_layers)


def _layer_indices(layers, n_layers):
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, torch.Tensor):
        if layers.dim() != 1 or layers.dtype in (torch.bool,) or layers.is_floating_point() or layers.is_complex():
            raise TypeError(f"mahalanobis: layers must be a 1-D integer tensor, got {layers.dtype} "
                            f"of shape {tuple(layers.shape)}")
        layers = layers.tolist()
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"mahalanobis: layer indices must be ints, got {i!r}")
        if not -n_layers <= i < n_layers:
            raise ValueError(f"mahalanobis: layer index {i} out of range for L = {n_layers}")
        out.append(i % n_layers)
    if not out:
        raise ValueError("mahalanobis: layers is empty")
    return out


def _reference(features, means, whiteners, layers, reduce, squared):
    return mahalanobis_reference(features, means, whiteners, layers, reduce, squared)


def _check_native_dtypes(features, means, whiteners, backend):
    if features.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"mahalanobis[{backend}]: features must be float32 or bfloat16, got {features.dtype}")
    if means.dtype != torch.float32 or whiteners.dtype != torch.float32:
        raise TypeError(f"mahalanobis[{backend}]: means and whiteners must be float32, got {means.dtype} "
                        f"and {whiteners.dtype}")


def native_bf16_cpu():
    """Whether this CPU has bf16 dot-product instructions (AMX or AVX512-BF16), i.e. whether the opt-in
    precision="bf16" can be faster than fp32. Informational only: no default path depends on it."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def mahalanobis_cpu(features, means, whiteners, layers, reduce, squared, bf16_gemm=False):
    """The C++ op. bf16_gemm=False: bf16 features upcast, fp32 GEMM (the op's contract). bf16_gemm=True
    (precision="bf16"): the centred block and W rounded to bf16, bf16 GEMM with fp32 accumulation, for
    fp32 or bf16 features alike."""
    if features.device.type not in ("cpu", "meta"):
        raise ValueError(f"mahalanobis[cpu]: tensors must be on the CPU, got {features.device}")
    _check_native_dtypes(features, means, whiteners, "cpu")
    return torch.ops.dupfast.mahalanobis(features, means, whiteners, layers, squared, reduce == "min",
                                         bool(bf16_gemm))


def _cuda(features, means, whiteners, layers, reduce, squared):
    if features.device.type != "cuda":
        raise ValueError(f"mahalanobis[cuda]: tensors must be on a CUDA device, got {features.device}")
    _check_native_dtypes(features, means, whiteners, "cuda")
    return torch.ops.dupfast.mahalanobis(features, means, whiteners, layers, squared, reduce == "min", False)


def _triton(features, means, whiteners, layers, reduce, squared):
    _check_native_dtypes(features, means, whiteners, "triton")
    return mahalanobis_triton.mahalanobis_triton(features, means, whiteners, layers, reduce, squared)


def _fake(features, means, whiteners, layers, squared, reduce_min, bf16_gemm):
    n, k = features.shape[0], means.shape[1]
    shape = (n, len(layers)) if reduce_min else (n, len(layers), k)
    return features.new_empty(shape, dtype=torch.float32)


register_op(OP, _fake, reference=_reference, cpu=mahalanobis_cpu, cuda=_cuda, triton=_triton,
            triton_available=mahalanobis_triton.available)

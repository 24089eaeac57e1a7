"""Token-level multi-layer Mahalanobis scores, one call for all (selected) layers.

    token_mahalanobis(hidden, mask, means, whiteners, classes=None, layers=None, topk=1, squared=False,
                      backend=None)
        -> (scores [B, L'] float32, argmax [B, L'] int64)
       (the reference backend given fp64 inputs returns fp64 scores: the tests' oracle)

hidden: the per-layer token states, a sequence (list/tuple) of L tensors [B, T, d] (what a Hugging Face model
returns as output_hidden_states: it is not stacked) or one [L, B, T, d] tensor; float32 or bfloat16 (upcast
exactly, fp32 accumulation). Any batch/token strides are read in place; a layer whose last dimension is not
contiguous is copied (that layer only). mask: [B, T] bool or integer attention mask, nonzero = a real token.
means [L, K, d] and whiteners [L, d, d] are float32; whiteners[l] is a factor W of layer l's precision
(P = W W^T, the lower Cholesky factor in dupfast's detector), the convention of `mahalanobis`.
classes: optional [B] int64 in [0, K): row b is measured from means[l, classes[b]] (predicted-class
Mahalanobis); None requires K == 1 (class-agnostic). layers: optional indices (negative allowed), as in
`mahalanobis`.

Per (row b, selected layer l), for every valid token t:
    q_t = ||(h[l][b, t] - mu) W_l||^2,   dist_t = sqrt(max(q_t, 0))   (q_t itself when squared=True)
    scores[b, l] = mean of the topk largest dist_t over the row's valid tokens (all of them if fewer are valid)
    argmax[b, l] = the index t of the largest dist_t; ties go to the LOWEST token index
A row with no valid token (all pad): score 0 and argmax -1. A NaN distance ranks above every number (a NaN
token is never hidden: the score is NaN and argmax is its index, the lowest one if several). A valid token with
an infinite hidden value has a non-finite distance: +inf, or NaN where the GEMM multiplies the infinity by one
of W's zeros (a triangular factor's upper triangle); either way it ranks above every finite distance. Pad
positions are never read by the native backends (NaN or garbage there is harmless on every backend).

Backends (dupfast.ops._dispatch): reference (token_mahalanobis_reference.py: whitens whole layers), cpu
(csrc/token_mahalanobis_cpu.cpp), triton (token_mahalanobis_triton.py), cuda (csrc/cuda/token_mahalanobis_kernel.cu).
The native ones multiply only valid tokens (pads are skipped before the GEMM: work proportional to the valid
tokens) and never hold a whitened copy of more than one block of tokens; the per-row reduction (order, kept
top-k list, merge, finish) is csrc/token_mahalanobis_math.h, shared by the cpu and cuda backends. The GPU
backends keep an [L', B, T] fp32 buffer of distances between their two kernels (1/d of a whitened copy), and
support min(topk, T) <= MAX_GPU_TOPK (triton also T <= 8192). The wrapper's check that classes lie in [0, K)
reads them (a device sync on a GPU); the cuda op itself never syncs (its valid-token list is built on the
device), triton's token list does. No gradient is defined (detection scores only).
"""
import torch

from . import token_mahalanobis_triton
from ._dispatch import register_op, resolve
from .token_mahalanobis_reference import token_mahalanobis_reference

OP = "token_mahalanobis"
MAX_GPU_TOPK = 128   # DUPFAST_TM_MAX_TOPK of csrc/cuda/token_mahalanobis_launch.h: the cuda/triton kept list


def token_mahalanobis(hidden, mask, means, whiteners, classes=None, layers=None, topk=1, squared=False,
                      backend=None):
    """Per-row reduced token distances to the per-layer (per-class) means under W W^T, and the arg-max token."""
    hidden, mask, classes, layers = _check_args(hidden, mask, means, whiteners, classes, layers, topk, squared)
    _, fn = resolve(OP, hidden[0].device, backend)
    return fn(hidden, mask, means, whiteners, classes, layers, int(topk), bool(squared))


def _err(msg):
    return f"token_mahalanobis: {msg}"


def _hidden_list(hidden):
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() != 4:
            raise ValueError(_err(f"a hidden tensor must be stacked [L, B, T, d], got shape {tuple(hidden.shape)} "
                                  "(or pass the layers as a list of [B, T, d] tensors)"))
        return list(hidden.unbind(0))   # views: no copy
    if not isinstance(hidden, (list, tuple)):
        raise TypeError(_err(f"hidden must be a list/tuple of [B, T, d] tensors or one [L, B, T, d] tensor, got "
                             f"{type(hidden).__name__}"))
    hidden = list(hidden)
    if not hidden:
        raise ValueError(_err("hidden has no layers"))
    for i, h in enumerate(hidden):
        if not isinstance(h, torch.Tensor):
            raise TypeError(_err(f"hidden[{i}] must be a torch.Tensor, got {type(h).__name__}"))
    return hidden


def _check_args(hidden, mask, means, whiteners, classes, layers, topk, squared):
    """Validates the arguments; returns (hidden as a list, mask, classes as int64 or None, layer indices)."""
    hidden = _hidden_list(hidden)
    h0 = hidden[0]
    if h0.dim() != 3:
        raise ValueError(_err(f"every hidden layer must be [B, T, d], got shape {tuple(h0.shape)}"))
    for i, h in enumerate(hidden):
        if h.shape != h0.shape:
            raise ValueError(_err(f"hidden layers differ in shape: hidden[{i}] {tuple(h.shape)} vs hidden[0] "
                                  f"{tuple(h0.shape)}"))
        if h.dtype != h0.dtype:
            raise TypeError(_err(f"hidden layers differ in dtype: hidden[{i}] {h.dtype} vs hidden[0] {h0.dtype}"))
        if h.device != h0.device:
            raise ValueError(_err(f"hidden layers on different devices: hidden[{i}] on {h.device}, hidden[0] on "
                                  f"{h0.device}"))
    if not h0.is_floating_point():
        raise TypeError(_err(f"hidden must be floating point, got {h0.dtype}"))
    n_layers = len(hidden)
    B, T, d = h0.shape
    if d == 0:
        raise ValueError(_err(f"hidden has d = 0: {tuple(h0.shape)}"))
    for name, t in (("mask", mask), ("means", means), ("whiteners", whiteners)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(_err(f"{name} must be a torch.Tensor, got {type(t).__name__}"))
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(_err(f"mask must be bool or integer (nonzero = real token), got {mask.dtype}"))
    if tuple(mask.shape) != (B, T):
        raise ValueError(_err(f"mask must be [B, T] = [{B}, {T}] to match hidden {tuple(h0.shape)}, got "
                              f"{tuple(mask.shape)}"))
    for name, t in (("means", means), ("whiteners", whiteners)):
        if not t.is_floating_point():
            raise TypeError(_err(f"{name} must be a floating-point tensor, got {t.dtype}"))
    if means.dim() != 3 or means.shape[0] != n_layers or means.shape[2] != d:
        raise ValueError(_err(f"means must be [L, K, d] = [{n_layers}, K, {d}] to match {n_layers} hidden layers of "
                              f"d = {d}, got {tuple(means.shape)}"))
    K = means.shape[1]
    if K == 0:
        raise ValueError(_err("means has K = 0 means per layer"))
    if tuple(whiteners.shape) != (n_layers, d, d):
        raise ValueError(_err(f"whiteners must be [L, d, d] = [{n_layers}, {d}, {d}], got {tuple(whiteners.shape)}"))
    for name, t in (("mask", mask), ("means", means), ("whiteners", whiteners)):
        if t.device != h0.device:
            raise ValueError(_err(f"tensors on different devices: hidden on {h0.device}, {name} on {t.device}"))
    classes = _check_classes(classes, B, K, h0.device)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(_err(f"topk must be an int >= 1, got {topk!r}"))
    if not isinstance(squared, bool):
        raise TypeError(_err(f"squared must be a bool, got {type(squared).__name__}"))
    return hidden, mask, classes, _layer_indices(layers, n_layers)


def _check_classes(classes, B, K, device):
    if classes is None:
        if K != 1:
            raise ValueError(_err(f"means has K = {K} means per layer: pass classes (one int64 class per row, the "
                                  "mean each row is measured from), or means with K = 1 for class-agnostic scores"))
        return None
    if not isinstance(classes, torch.Tensor):
        raise TypeError(_err(f"classes must be a torch.Tensor or None, got {type(classes).__name__}"))
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise TypeError(_err(f"classes must be an integer tensor, got {classes.dtype}"))
    if tuple(classes.shape) != (B,):
        raise ValueError(_err(f"classes must be [B] = [{B}], got {tuple(classes.shape)}"))
    if classes.device != device:
        raise ValueError(_err(f"tensors on different devices: hidden on {device}, classes on {classes.device}"))
    classes = classes.to(torch.int64)
    if B and classes.device.type != "meta":
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi >= K:
            raise ValueError(_err(f"classes must be in [0, K) = [0, {K}), got values in [{lo}, {hi}]"))
    return classes


def _layer_indices(layers, n_layers):
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, torch.Tensor):
        if layers.dim() != 1 or layers.dtype == torch.bool or layers.is_floating_point() or layers.is_complex():
            raise TypeError(_err(f"layers must be a 1-D integer tensor, got {layers.dtype} of shape "
                                 f"{tuple(layers.shape)}"))
        layers = layers.tolist()
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(_err(f"layer indices must be ints, got {i!r}"))
        if not -n_layers <= i < n_layers:
            raise ValueError(_err(f"layer index {i} out of range for L = {n_layers}"))
        out.append(i % n_layers)
    if not out:
        raise ValueError(_err("layers is empty"))
    return out


def _reference(hidden, mask, means, whiteners, classes, layers, topk, squared):
    scores, argmax = token_mahalanobis_reference(hidden, mask, means, whiteners, classes, layers, topk, squared)
    return (scores if scores.dtype == torch.float64 else scores.float()), argmax


def _check_native(hidden, means, whiteners, backend):
    if hidden[0].dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(_err(f"[{backend}] hidden must be float32 or bfloat16, got {hidden[0].dtype}"))
    if means.dtype != torch.float32 or whiteners.dtype != torch.float32:
        raise TypeError(_err(f"[{backend}] means and whiteners must be float32, got {means.dtype} and "
                             f"{whiteners.dtype}"))


def _check_gpu_topk(hidden, topk, backend):
    keff = min(topk, hidden[0].shape[1])
    if keff > MAX_GPU_TOPK:
        raise ValueError(_err(f"[{backend}] min(topk, T) = {keff} > {MAX_GPU_TOPK}, the largest kept list of the "
                              "GPU kernels; use the cpu or reference backend"))


def _cpu(hidden, mask, means, whiteners, classes, layers, topk, squared):
    if hidden[0].device.type not in ("cpu", "meta"):
        raise ValueError(_err(f"[cpu] tensors must be on the CPU, got {hidden[0].device}"))
    _check_native(hidden, means, whiteners, "cpu")
    return torch.ops.dupfast.token_mahalanobis(hidden, mask, means, whiteners, classes, layers, topk, squared)


def _cuda(hidden, mask, means, whiteners, classes, layers, topk, squared):
    if hidden[0].device.type != "cuda":
        raise ValueError(_err(f"[cuda] tensors must be on a CUDA device, got {hidden[0].device}"))
    _check_native(hidden, means, whiteners, "cuda")
    _check_gpu_topk(hidden, topk, "cuda")
    return torch.ops.dupfast.token_mahalanobis(hidden, mask, means, whiteners, classes, layers, topk, squared)


def _triton(hidden, mask, means, whiteners, classes, layers, topk, squared):
    _check_native(hidden, means, whiteners, "triton")
    _check_gpu_topk(hidden, topk, "triton")
    return token_mahalanobis_triton.token_mahalanobis_triton(hidden, mask, means, whiteners, classes, layers, topk,
                                                             squared)


def _fake(hidden, mask, means, whiteners, classes, layers, topk, squared):
    B = hidden[0].shape[0]
    return (hidden[0].new_empty((B, len(layers)), dtype=torch.float32),
            hidden[0].new_empty((B, len(layers)), dtype=torch.int64))


register_op(OP, _fake, reference=_reference, cpu=_cpu, cuda=_cuda, triton=_triton,
            triton_available=token_mahalanobis_triton.available)

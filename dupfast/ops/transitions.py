"""Per-sample layer Gram and the two transition signals derived from it (methods.md section 8.1).

    layer_transitions(features [N, L, d], backend=None)
        -> (gram [N, L, L], cosines [N, L-1], concentration [N]), all float32

gram = H H^T per sample (fp64 accumulation in the native backends), cosines c_l between consecutive
layers (0 when a norm is 0), concentration = sigma_1 / sum(sigma) of the consecutive-difference
matrix (DUP's "SS" score; 0 when every sigma is 0), with sigma^2 the eigenvalues of the (L-1)x(L-1)
difference Gram K derived from G. A sample with a non-finite feature gets NaN cosines and
concentration. features may be float32 or bfloat16.

Backends: reference (transitions_reference.py: batched svdvals of the explicit differences), cpu
(csrc/transitions_cpu.cpp), triton (transitions_triton.py), cuda (csrc/cuda/transitions_kernel.cu).
"""
import torch

from . import transitions_triton
from ._dispatch import register_op, resolve
from .transitions_reference import layer_transitions_reference

OP = "layer_transitions"


def layer_transitions(features, backend=None):
    """Gram, consecutive-layer cosines and spectral concentration of each sample's layer features."""
    _check_args(features)
    _, fn = resolve(OP, features.device, backend)
    return fn(features)


def _check_args(features):
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"layer_transitions: features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"layer_transitions: features must be a floating-point tensor, got {features.dtype}")
    if features.dim() != 3:
        raise ValueError(f"layer_transitions: features must be [N, L, d], got shape {tuple(features.shape)}")
    if features.shape[1] < 2:
        raise ValueError(f"layer_transitions: need at least 2 layers, got L = {features.shape[1]}")
    if features.shape[2] == 0:
        raise ValueError("layer_transitions: features have d = 0 dimensions")


def _check_native_dtype(features, backend):
    if features.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"layer_transitions[{backend}]: features must be float32 or bfloat16, got {features.dtype}")


def _cpu(features):
    if features.device.type not in ("cpu", "meta"):
        raise ValueError(f"layer_transitions[cpu]: features must be on the CPU, got {features.device}")
    _check_native_dtype(features, "cpu")
    return tuple(torch.ops.dupfast.layer_transitions(features))


def _cuda(features):
    if features.device.type != "cuda":
        raise ValueError(f"layer_transitions[cuda]: features must be on a CUDA device, got {features.device}")
    _check_native_dtype(features, "cuda")
    return tuple(torch.ops.dupfast.layer_transitions(features))


def _triton(features):
    _check_native_dtype(features, "triton")
    return transitions_triton.layer_transitions_triton(features)


def _fake(features):
    n, n_layers = features.shape[0], features.shape[1]
    return (features.new_empty((n, n_layers, n_layers), dtype=torch.float32),
            features.new_empty((n, n_layers - 1), dtype=torch.float32),
            features.new_empty((n,), dtype=torch.float32))


register_op(OP, _fake, reference=layer_transitions_reference, cpu=_cpu, cuda=_cuda, triton=_triton,
            triton_available=transitions_triton.available)

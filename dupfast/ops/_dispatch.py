"""The one place that chooses a backend for each op.

Each op module registers its implementations with `register(op, backend, fn, available)`.
`resolve(op, device, backend)` picks: the `backend` argument if given, else $DUPFAST_BACKEND if
set, else the first available backend in preference order for the tensor's device:

    cuda device:  cuda  > triton > reference
    cpu device:   cpu   > reference

Triton is also picked on CPU tensors when TRITON_INTERPRET=1 and it is forced (tests).
"""
import os

BACKENDS = ("reference", "cpu", "triton", "cuda")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_REGISTRY = {}  # op -> {backend: (fn, available)}


def register(op, backend, fn, available=lambda: True):
    """available() is called lazily at dispatch time (it may import triton or load the extension)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, available)


def available_backends(op):
    return [b for b, (_, ok) in _REGISTRY.get(op, {}).items() if ok()]


def resolve(op, device, backend=None):
    """Return (backend_name, fn) for op on `device` (a torch.device or str)."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"dupfast op {op!r} has no registered implementation")
    forced = backend or os.environ.get("DUPFAST_BACKEND") or None
    if forced:
        if forced not in impls:
            raise ValueError(f"op {op!r} has no {forced!r} backend; it has {sorted(impls)}")
        fn, ok = impls[forced]
        if not ok():
            raise RuntimeError(f"backend {forced!r} for op {op!r} is not available in this build/machine "
                               f"(available: {available_backends(op)})")
        return forced, fn
    dev_type = getattr(device, "type", str(device).split(":")[0])
    for name in _PREFERENCE.get(dev_type, ("reference",)):
        if name in impls and impls[name][1]():
            return name, impls[name][0]
    return "reference", impls["reference"][0]


def register_op(op, fake, reference, cpu, cuda, triton, triton_available, native=None):
    """Registers the four backends of an op whose compiled kernel is `dupfast::<native>` (default: the
    op's name): cpu and cuda are available when the extension has that kernel for their device, and the
    fake (meta) kernel is registered with torch when the extension is loaded, so torch.compile and meta
    tensors can trace it."""
    import torch

    from .. import _ext

    native = native or op
    register(op, "reference", reference)
    register(op, "cpu", cpu, lambda: _ext.has_op(native))
    register(op, "cuda", cuda, lambda: _ext.has_cuda_op(native))
    register(op, "triton", triton, triton_available)
    if _ext.has_op(native):
        torch.library.register_fake(f"dupfast::{native}")(fake)

"""Load the compiled extension once. Everything works without it (pure-PyTorch reference ops),
with one warning saying so."""
import os
import warnings

import torch  # noqa: F401  (must be imported before the extension: it resolves torch's symbols)

_LOADED = None
_ERROR = None


def load():
    """Import dupfast._C, registering the torch.ops.dupfast.* kernels. Returns True if loaded."""
    global _LOADED, _ERROR
    if _LOADED is not None:
        return _LOADED
    try:
        from . import _C  # noqa: F401
        _LOADED = True
    except ImportError as exc:
        _LOADED, _ERROR = False, exc
        if os.environ.get("DUPFAST_REQUIRE_EXT") == "1":
            raise ImportError(f"dupfast: DUPFAST_REQUIRE_EXT=1 but the compiled extension failed to load: {exc}") from exc
        warnings.warn(
            f"dupfast: compiled kernels unavailable ({exc}); using the pure-PyTorch reference ops. "
            "Build them with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
    return _LOADED


def has_op(name):
    """Whether torch.ops.dupfast.<name> has a kernel registered (extension loaded and op compiled in)."""
    if not load():
        return False
    try:
        getattr(torch.ops.dupfast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def load_error():
    return _ERROR


def has_cuda_op(name):
    """Whether torch.ops.dupfast.<name> can run on this machine's GPU: a CUDA device is visible and the
    extension was built with the op's CUDA kernel."""
    return (torch.cuda.is_available() and has_op(name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"dupfast::{name}", "CUDA"))

"""Multi-layer Mahalanobis distance, dispatched to the best backend."""
from ._dispatch import register, resolve
from .mahalanobis_reference import mahalanobis_reference


def _check(features, means, whiteners):
    if features.dim() != 3:
        raise ValueError(f"features must be [N, L, d], got shape {tuple(features.shape)}")
    n, L, d = features.shape
    if means.dim() != 3 or means.shape[0] != L or means.shape[2] != d:
        raise ValueError(f"means must be [L={L}, K, d={d}], got {tuple(means.shape)}")
    if tuple(whiteners.shape) != (L, d, d):
        raise ValueError(f"whiteners must be [L={L}, d={d}, d={d}], got {tuple(whiteners.shape)}")


def mahalanobis(features, means, whiteners, layers=None, reduce="min", squared=False, backend=None):
    """Distances [N, L'] (min over the K means) or [N, L', K] (reduce='none') of features [N, L, d]
    to per-layer means [L, K, d] under whitening factors [L, d, d] (lower Cholesky of the precision)."""
    _check(features, means, whiteners)
    _, fn = resolve("mahalanobis", features.device, backend)
    return fn(features, means, whiteners, layers=layers, reduce=reduce, squared=squared)


register("mahalanobis", "reference", mahalanobis_reference)

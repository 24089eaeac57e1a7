"""Building blocks the scorers share: streaming Gaussian fits, DUP's layer selection, the two kernels.

The two heavy computations go through dupfast.ops (the kernel dispatch point): the multi-layer
Mahalanobis distance and the per-sample layer Gram (cosines + DUP's spectral concentration).
"""
import warnings

import torch

from ... import ops
from ..stats import SHRINKAGE, LayerStats, calinski_harabasz, shrunk_covariance, whiteners

FIT_CHUNK = 256  # rows per LayerStats.update when fitting from features already in memory


def fit_stats(x: torch.Tensor, labels, num_classes: int) -> LayerStats:
    """Streaming fp64 statistics of x [N, L, d] (chunk by chunk), summed over ranks."""
    st = LayerStats(x.shape[1], x.shape[2], num_classes)
    for i in range(0, x.shape[0], FIT_CHUNK):
        st.update(x[i:i + FIT_CHUNK], None if labels is None else labels[i:i + FIT_CHUNK])
    return st.all_reduce()


def gaussian(st: LayerStats, class_conditional: bool, shrinkage: float = SHRINKAGE):
    """(means [L, K, d], whiteners [L, d, d]): one class-agnostic Gaussian (K = 1), or class means with
    one tied covariance fitted on class-centred features (DAN's estimator)."""
    if class_conditional:
        present = st.present_classes()
        return st.class_means()[:, present].float(), whiteners(shrunk_covariance(st.covariance(True), shrinkage)).float()
    return st.mean().unsqueeze(1).float(), whiteners(shrunk_covariance(st.covariance(), shrinkage)).float()


def select_top_k(values: torch.Tensor, k: int) -> list:
    """Indices of the k largest values, ties broken by the lower index (Python's stable sort, as DUP)."""
    order = sorted(range(values.numel()), key=lambda i: -float(values[i]))
    return sorted(order[:k])


def ch_layers(st: LayerStats, top_k: int):
    """DUP's layer selection: top-k layers by Calinski-Harabasz of the calibration features against the
    true labels. With one class CH is undefined: warn and use every layer."""
    try:
        ch = calinski_harabasz(st)
    except ValueError as exc:
        warnings.warn(f"{exc}; using all {st.num_layers} layers instead of the top-{top_k} by CH", stacklevel=3)
        return list(range(st.num_layers)), None
    return select_top_k(ch, min(top_k, st.num_layers)), ch


def layer_distances(features, means, whiteners, reduce="min", squared=False):
    """Mahalanobis distances [N, L] ([N, L, K] for reduce='none') of features [N, L, d] to per-layer
    means [L, K, d] under whiteners [L, d, d]; K = 1 is DUP's class-agnostic Gaussian."""
    dev = features.device
    return ops.mahalanobis(features, means.to(dev, torch.float32), whiteners.to(dev, torch.float32),
                           reduce=reduce, squared=squared)


def transitions(features):
    """(gram [N, L, L], cosines [N, L-1], concentration [N]) from one per-sample layer Gram."""
    return ops.layer_transitions(features)


def check_shrinkage(shrinkage: float) -> float:
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be a number in [0, 1], got {shrinkage!r}")
    return float(shrinkage)

"""Pure-PyTorch layer transitions: the oracle every backend is held to.

Straight from the definitions (methods.md section 8.1): the per-sample Gram H H^T, consecutive-layer
cosines from the features, and DUP's spectral concentration sigma_1 / sum(sigma) from a batched
`torch.linalg.svdvals` of the explicit [N, L-1, d] difference matrices (what the authors compute with
one NumPy SVD per sample). A sample with any non-finite feature gets NaN cosines and concentration
(svdvals would raise on it).
"""
import torch


def layer_transitions_reference(features):
    """features [N, L, d] -> (gram [N, L, L], cosines [N, L-1], concentration [N])."""
    h = features.float() if features.dtype in (torch.bfloat16, torch.float16) else features
    gram = torch.bmm(h, h.transpose(1, 2))

    finite = torch.isfinite(h).flatten(1).all(dim=1)
    norms = h.norm(dim=2)
    denom = norms[:, :-1] * norms[:, 1:]
    dots = (h[:, :-1] * h[:, 1:]).sum(dim=2)
    cosines = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1), 0).clamp(-1, 1)

    delta = torch.diff(torch.where(finite[:, None, None], h, 0), dim=1)
    sigma = torch.linalg.svdvals(delta)
    total = sigma.sum(dim=1)
    concentration = torch.where(total > 0, sigma[:, 0] / torch.where(total > 0, total, 1), 0)

    nan = torch.full_like(concentration, float("nan"))
    cosines = torch.where(finite[:, None], cosines, nan[:, None])
    concentration = torch.where(finite, concentration, nan)
    return gram, cosines, concentration

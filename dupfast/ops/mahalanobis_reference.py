"""Pure-PyTorch multi-layer Mahalanobis distance: the oracle the kernels are held to."""
import torch


def mahalanobis_reference(features, means, whiteners, layers=None, reduce="min", squared=False):
    """features [N, L, d], means [L, K, d], whiteners [L, d, d] (P = W W^T) -> [N, L'] or [N, L', K].

    The authors' form: q = (x - mu)^T P (x - mu), per layer, per class; sqrt(relu(q)) unless squared."""
    idx = range(features.shape[1]) if layers is None else [int(i) for i in layers]
    out = []
    for l in idx:
        x = features[:, l, :].float()
        W = whiteners[l].float()
        P = W @ W.T
        qs = []
        for k in range(means.shape[1]):
            z = x - means[l, k].float()
            qs.append(torch.einsum("bi,ij,bj->b", z, P, z))
        out.append(torch.stack(qs, dim=-1))
    q = torch.stack(out, dim=1)  # [N, L', K]
    if reduce == "min":
        q = q.min(dim=-1).values
    elif reduce != "none":
        raise ValueError(f"reduce must be 'min' or 'none', not {reduce!r}")
    return q if squared else q.clamp_min(0).sqrt()

"""Pure-PyTorch multi-layer Mahalanobis distances: the oracle every backend is held to.

Two forms of q_k(x) = (x - mu_k)^T P (x - mu_k) with P = W W^T:

* `mahalanobis_precision_reference`: the authors' naive form (DUP's MSDefender), per layer and mean
  `einsum('bi,ij,bj->b', x - mu, P, x - mu)`, holding an [N, d] centred copy and an [N, d] product.
* `mahalanobis_whitened_reference`: ||(x - mu) W||^2, the form the fast backends compute.

16-bit features are upcast to fp32 first (the op promises fp32 accumulation); fp64 inputs stay fp64,
which is how the tests build their oracle.
"""
import torch


def _compute_dtype(features):
    return torch.float32 if features.dtype in (torch.bfloat16, torch.float16) else features.dtype


def _finish(q, reduce, squared):
    # q: [N, L', K]. Tiny negatives from finite precision are clamped before the sqrt (DUP's relu).
    dist = q if squared else torch.sqrt(torch.relu(q))
    return dist.amin(dim=-1) if reduce == "min" else dist


def _layer_list(layers, n_layers):
    return list(range(n_layers)) if layers is None else [int(i) for i in layers]


def mahalanobis_precision_reference(features, means, precisions, layers=None, reduce="min", squared=False):
    """The authors' form with explicit precision matrices P [L, d, d]."""
    dt = _compute_dtype(features)
    per_layer = []
    for layer in _layer_list(layers, features.shape[1]):
        x = features[:, layer, :].to(dt)
        P = precisions[layer].to(dt)
        q = [torch.einsum("bi,ij,bj->b", x - mu, P, x - mu) for mu in means[layer].to(dt)]
        per_layer.append(torch.stack(q, dim=-1))
    return _finish(torch.stack(per_layer, dim=1), reduce, squared)


def mahalanobis_whitened_reference(features, means, whiteners, layers=None, reduce="min", squared=False):
    """||(x - mu_k) W||^2 per layer and mean, W [L, d, d]."""
    dt = _compute_dtype(features)
    per_layer = []
    for layer in _layer_list(layers, features.shape[1]):
        x = features[:, layer, :].to(dt)
        W = whiteners[layer].to(dt)
        q = [((x - mu) @ W).square().sum(dim=-1) for mu in means[layer].to(dt)]
        per_layer.append(torch.stack(q, dim=-1))
    return _finish(torch.stack(per_layer, dim=1), reduce, squared)


def mahalanobis_reference(features, means, whiteners, layers=None, reduce="min", squared=False):
    """The authors' precision form, with P = W W^T formed from the whitening factors."""
    dt = _compute_dtype(features)
    W = whiteners.to(dt)
    return mahalanobis_precision_reference(features, means, W @ W.transpose(-1, -2), layers, reduce, squared)

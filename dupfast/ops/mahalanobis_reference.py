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


# --- precision="bf16": the opt-in fast mode of the cpu backend, its emulation and its error bound ---

BF16_UNIT_ROUNDOFF = 2.0 ** -8   # round-to-nearest with an 8-bit significand
_EPS32 = torch.finfo(torch.float32).eps


def _bf16_round(t):
    return t.to(torch.bfloat16).to(torch.float32)


def _centroid_and_shifts(means_l, W_l):
    """mu0 = mean of the K means (fp64 sum, fp32 result) and s_k = (mu_k - mu0) W in fp64, as the cpu op."""
    mu0 = means_l.double().mean(dim=0).float()
    shifts = (means_l.double() - mu0.double()) @ W_l.double()
    return mu0, shifts


def mahalanobis_bf16_reference(features, means, whiteners, layers=None, reduce="min", squared=False):
    """Emulates precision="bf16" of the cpu op: c = x - mu0 (fp32) rounded to bf16, W rounded to bf16,
    y = c W accumulated in fp32 and rounded to bf16 (the GEMM's output type), q_k = ||y - s_k||^2 in fp32."""
    per_layer = []
    for layer in _layer_list(layers, features.shape[1]):
        mu0, shifts = _centroid_and_shifts(means[layer], whiteners[layer])
        c = _bf16_round(features[:, layer, :].float() - mu0)
        y = _bf16_round(c @ _bf16_round(whiteners[layer].float()))
        q = [(y - s.float()).square().sum(dim=-1) for s in shifts]
        per_layer.append(torch.stack(q, dim=-1))
    return _finish(torch.stack(per_layer, dim=1), reduce, squared)


def bf16_error_bound(features, means, whiteners, layers=None, reduce="min", squared=False, sigmas=None):
    """fp64 bound on |precision="bf16" output - exact output|, per row and layer (and mean for
    reduce="none"), from the error model in dupfast/ops/mahalanobis.py. With c = x - mu0, y = c W,
    s_k = (mu_k - mu0) W, r = y - s_k, u = 2^-8 (bf16), eps32 = 2^-23:

    worst case (sigmas=None):
        |y^_j - y_j| <= e_j = (3u + 4u^2 + (d + 2) eps32) sum_i |c_i| |W_ij| + eps32 |s_kj|
        |q^_k - q_k| <= sum_j (2 |r_j| e_j + e_j^2) + 2 (d + 2) eps32 q_k

    statistical (sigmas=k): the three roundings (of c_i, of W_ij, of y_j) as independent relative
    errors of variance u^2/3, to first order
        var(q^_k - q_k) = 4 u^2/3 [sum_i c_i^2 (W r)_i^2 + sum_ij c_i^2 W_ij^2 r_j^2 + sum_j y_j^2 r_j^2]
    and the bound is min(worst case, k sigma + the fp32 terms): sqrt(d) tighter at large d.

    Distances: |sqrt(q^) - sqrt(q)| <= min(sqrt(dq), dq / sqrt(q)); a min over K moves by at most the
    largest per-mean bound."""
    u, d = BF16_UNIT_ROUNDOFF, features.shape[2]
    rel = 3 * u + 4 * u * u + (d + 2) * _EPS32
    per_layer = []
    for layer in _layer_list(layers, features.shape[1]):
        W = whiteners[layer].double()
        mu0 = means[layer].double().mean(dim=0)
        c = features[:, layer, :].double() - mu0
        y = c @ W
        spread = c.abs() @ W.abs()                                    # [N, d]: sum_i |c_i||W_ij|
        c2_w2 = None if sigmas is None else c.square() @ W.square()   # [N, d]: sum_i c_i^2 W_ij^2
        bounds = []
        for mu in means[layer].double():
            s = (mu - mu0) @ W
            e = rel * spread + _EPS32 * s.abs()
            r = y - s
            q = r.square().sum(-1)
            fp32_terms = 2 * (d + 2) * _EPS32 * q
            dq = (2 * r.abs() * e + e * e).sum(-1) + fp32_terms
            if sigmas is not None:
                var = (4 * u * u / 3) * ((c.square() * (r @ W.T).square()).sum(-1)
                                         + (c2_w2 * r.square()).sum(-1) + (y.square() * r.square()).sum(-1))
                fp32_y = (2 * r.abs() * (d + 2) * _EPS32 * (spread + s.abs())).sum(-1)
                dq = torch.minimum(dq, sigmas * var.sqrt() + fp32_terms + fp32_y)
            bounds.append(dq if squared else torch.minimum(dq.sqrt(), dq / q.sqrt().clamp_min(1e-300)))
        per_layer.append(torch.stack(bounds, dim=-1))
    b = torch.stack(per_layer, dim=1)
    return b.amax(dim=-1) if reduce == "min" else b

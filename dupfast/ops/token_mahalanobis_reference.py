"""Pure-PyTorch token-level multi-layer Mahalanobis: a backend like the others, held to the tests' fp64 oracle.

Per selected layer l it forms the whitened tokens (h - mu) @ W of the whole [B, T, d] layer (the composition the
fused backends avoid), their squared norms q [B, T], the distances, and reduces every row over its valid tokens
(`reduce_rows_reference`): the mean of the topk largest distances and the index of the largest, ties to the
lowest index, NaN ranked above every number, a row without valid tokens giving (0, -1).

16-bit hidden states are upcast to fp32 (the op's fp32 accumulation); fp64 inputs stay fp64.
"""
import torch


def _compute_dtype(t):
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def _as_list(hidden):
    return list(hidden.unbind(0)) if isinstance(hidden, torch.Tensor) else list(hidden)


def token_distances_reference(hidden_l, mean_rows, W, squared=False):
    """hidden_l [B, T, d], mean_rows [B, d] (each row's mean), W [d, d] -> distances [B, T] in the compute dtype."""
    dt = _compute_dtype(hidden_l)
    y = (hidden_l.to(dt) - mean_rows.to(dt)[:, None, :]) @ W.to(dt)
    q = y.square().sum(dim=-1)
    return q if squared else torch.sqrt(torch.relu(q))   # relu keeps NaN


def reduce_rows_reference(dist, valid, topk):
    """dist [B, T], valid [B, T] bool -> (score [B], argmax [B] int64): the rows' valid tokens ranked valid
    first, NaN first, larger first, lower index first (three stable sorts, least significant key first)."""
    B, T = dist.shape
    order = torch.arange(T, device=dist.device).expand(B, T)
    nan = dist.isnan() & valid
    key = torch.where(nan, torch.inf, dist)
    order = order.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)
    for flag in (nan, valid):   # then NaN first, then valid first: stable, so the earlier keys break ties
        order = order.gather(1, torch.sort(flag.gather(1, order).to(torch.uint8), dim=1, descending=True,
                                           stable=True).indices)
    n = valid.sum(dim=1)
    kk = torch.clamp(n, max=topk)
    ranked = dist.gather(1, order)
    keep = torch.arange(T, device=dist.device)[None, :] < kk[:, None]
    score = torch.where(keep, ranked, torch.zeros((), dtype=dist.dtype, device=dist.device)).sum(dim=1)
    score = score / kk.clamp(min=1).to(dist.dtype)
    first = order[:, 0] if T > 0 else torch.zeros(B, dtype=torch.long, device=dist.device)
    argmax = torch.where(n > 0, first, torch.full_like(first, -1))
    return score, argmax


def token_mahalanobis_reference(hidden, mask, means, whiteners, classes=None, layers=None, topk=1, squared=False):
    """(scores [B, L'], argmax [B, L'] int64); scores in the compute dtype (fp32 unless the inputs are fp64)."""
    hidden = _as_list(hidden)
    valid = mask != 0
    layers = list(range(len(hidden))) if layers is None else [int(i) for i in layers]
    scores, argmaxes = [], []
    for layer in layers:
        mu = means[layer]
        mean_rows = mu[classes] if classes is not None else mu[0].expand(hidden[layer].shape[0], -1)
        dist = token_distances_reference(hidden[layer], mean_rows, whiteners[layer], squared)
        s, a = reduce_rows_reference(dist, valid, topk)
        scores.append(s)
        argmaxes.append(a)
    return torch.stack(scores, dim=1), torch.stack(argmaxes, dim=1)

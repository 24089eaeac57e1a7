"""BTU step 2: dimension-wise unlearning of the suspicious tokens' embeddings (the authors' `cut`).

After ordinary fine-tuning on the poisoned data, with E_pre the pretrained and E the fine-tuned matrix:

    c = ||E - E_pre||_F / V                          one global scalar, V = real vocabulary size
    for t in suspects, dimension j:  if |E[t,j] - E_pre[t,j]| > c:  E[t,j] = E_pre[r,j]

r = the replacement token (pretrained pad, or unk where the pad is borrowed from eos). Dimensions that
moved little keep their fine-tuned value. The code's mask arithmetic also zeroes dimensions that did not
move at all and doubles those exactly at c; here a dimension is either replaced (> c) or kept.
"""
from typing import Iterable

import torch

from .embeddings import input_embeddings


@torch.no_grad()
def unlearn_tokens(model, pretrained: torch.Tensor, token_ids: Iterable[int], replace_id: int, vocab: int) -> dict:
    """Apply the replacement in place on `model`'s input embeddings. Returns the threshold and, per token,
    how many dimensions were replaced."""
    weight = input_embeddings(model).weight
    if tuple(pretrained.shape) != tuple(weight.shape):
        raise ValueError(f"pretrained embeddings {tuple(pretrained.shape)} and the fine-tuned model's "
                         f"{tuple(weight.shape)} differ: the fine-tuned model must come from the same checkpoint")
    ids = sorted({int(t) for t in token_ids})
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    if not 0 <= replace_id < weight.shape[0]:
        raise ValueError(f"replacement token id {replace_id} is outside the embedding matrix")
    pre = pretrained.to(device=weight.device, dtype=torch.float32)
    cur = weight.detach().float()
    threshold = float((cur[:vocab] - pre[:vocab]).norm() / vocab)
    per_token = {}
    if ids:
        idx = torch.tensor(ids, device=weight.device)
        rows = cur[idx]
        moved = (rows - pre[idx]).abs() > threshold
        fill = pre[replace_id].expand_as(rows)
        weight[idx] = torch.where(moved, fill, rows).to(weight.dtype)
        per_token = {t: int(n) for t, n in zip(ids, moved.sum(1).tolist())}
    return {"threshold": threshold, "replace_id": int(replace_id), "dims": int(weight.shape[1]),
            "dims_replaced": per_token}

"""One forward pass per batch of prompts -> every layer's pooled prompt features, and the first response token's
distribution.

Features are those of `dupfast.detection.capture` (its `pool`: the attention mask's last real token, "last",
and the masked mean over the prompt, "mean"; correct under left and right padding), taken from the decoder's
layer outputs (embedding output excluded). The first response token's logits are the vocabulary head on the
prompt's last real token (the generation prompt's end): what greedy generation's first step reads; the
STRIP-like baseline takes their entropy.

"attn" among the poolings adds the attention signal of `dupfast.detection.attention` read at the prompt's last real
token (features["attn"] [B, 1, L*H] and the most-attended prompt token): opt in with
`detect_prompts(..., signals=("agnostic", "proj", "attn"))`. Only for decoders that dispatch attention through
transformers' AttentionInterface (Llama, Qwen, SmolLM2, ...); not measured on the generative victims yet, so not
in the prompt detector's default.
"""
from typing import Iterator, Sequence

import torch

from ..detection.attention import ATTN, AttentionProbe
from ..detection.capture import CapturedBatch, attention_columns, autocast_context, pool, probing
from .lm import final_hidden
from .rows import ChatRows, pad_right

CAPTURE_BATCH = 16


def capture_prompts(lm, rows: ChatRows, poolings: Sequence[str] = ("last", "mean"), batch_size: int = CAPTURE_BATCH,
                    autocast=None, first_token_logits: bool = False) -> Iterator[CapturedBatch]:
    """CapturedBatch per `batch_size` prompts (features {pooling: [B, L, d]}, logits None, or the first response
    token's logits [B, V] with first_token_logits=True; index: the rows' ids)."""
    model = lm.model
    probe = AttentionProbe(model, "last") if ATTN in poolings else None
    if probe is not None and not probe.use_interface:
        raise ValueError("the attention signal over prompts needs a decoder that dispatches attention through "
                         "transformers' AttentionInterface; drop 'attn' from the detector's signals")
    poolings = tuple(p for p in poolings if p != ATTN)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(rows), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(rows))))
            ids, mask = pad_right([rows.prompts[i] for i in idx], lm.pad_id, lm.device)
            with torch.inference_mode(), autocast_context(lm.device, autocast), probing(probe, mask):
                last, hidden = final_hidden(lm, ids, mask, output_hidden_states=True)
                feats = {p: torch.stack([pool(h, mask, p) for h in hidden], dim=1) for p in poolings}
                top = None
                if probe is not None:
                    feats[ATTN], top = attention_columns(probe, None, mask, "last", len(hidden),
                                                         f"prompt batch {lo // batch_size}")
                logits = None
                if first_token_logits:
                    end = mask.sum(1) - 1
                    logits = (last[torch.arange(len(idx), device=last.device), end].float() @ lm.weight.float().T)
            del hidden, last
            for p, f in feats.items():
                if not torch.isfinite(f).all():
                    raise ValueError(f"prompt batch {lo // batch_size}: the model produced NaN/inf hidden states "
                                     f"({p} pooling)")
            top_ids = None if top is None else torch.where(top >= 0, ids.gather(1, top.clamp_min(0)[:, None])[:, 0],
                                                           top).cpu()
            yield CapturedBatch({k: v.cpu() for k, v in feats.items()}, None if logits is None else logits.cpu(),
                                None if rows.labels is None else rows.labels[idx], rows.index[idx],
                                top_tokens=top_ids)
    finally:
        model.train(was_training)

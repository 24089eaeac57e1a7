"""Where the classifier's reading token looks: per layer and head, its attention row over the input.

A sequence classifier reads one token ([CLS] of an encoder, the last real token of a decoder). A backdoored
model learns to route that token's attention onto the trigger: on SST-2 (MiniLM victims) the largest
attention weight the reading token puts on any other token, per layer and head, separates triggered from
clean inputs at AUROC 1.000 for BadNets and AddSent with a 100-row clean set, where the pooled hidden states
reach 0.91 and per-token Mahalanobis distances of the token states 0.60-0.77 (docs/results/users-pools.md,
experiments/attention_signal.py). The token that receives the most attention is reported as the row's top
token: the inserted trigger for 100% of triggered BadNets / AddSent test inputs.

The rows are computed inside the forward pass that already runs: for models that dispatch attention through
transformers' `AttentionInterface` (BERT, RoBERTa, Llama, Qwen, ...), the implementation the model uses (sdpa,
eager, ...) is wrapped for the duration of the pass; the wrapper calls it unchanged and adds one query row per
head (q_read · Kᵀ under the padding mask and the model's own mask row — causal, sliding window — then a
softmax: O(B·H·T·d_head) per layer, no [T, T] matrix). Other models (MPNet, T5, ...) fall back to
`output_attentions=True` and keep only the reading token's row. Scores added inside the attention kernel
beyond the mask (soft-capping, learned sinks) are not modelled; tests/detect/test_attention.py holds the rows
to the models' own attention probabilities.

Per input the signal is the [L·H] vector of per-head maxima over the real tokens other than the reading
token, stored as features[ATTN] of shape [B, 1, L·H] so the detector's streaming statistics fit it like a
pooled feature; its class-agnostic Mahalanobis distance is the "attn" column (scorers/default.py).
"""
import contextlib
import sys
from typing import Optional

import torch

ATTN = "attn"          # the features key: [B, 1, L*H] per-head attention maxima
QUERIES = {"cls": "first", "last": "last"}  # pooling -> the reading token


def supported(model, pooling: str) -> bool:
    """Whether the attention signal applies: a HF model with a reading token (cls / last pooling), not an
    encoder-decoder (its decoder reads through cross-attention)."""
    config = getattr(model, "config", None)
    return (pooling in QUERIES and config is not None and not getattr(config, "is_encoder_decoder", False)
            and hasattr(model, "forward"))


def reading_positions(mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B] position of the token the classifier reads, under left or right padding."""
    from .capture import first_token_index, last_token_index
    return first_token_index(mask) if QUERIES[pooling] == "first" else last_token_index(mask)


class AttentionProbe:
    """Context manager around one model's forward passes; `rows(outputs)` after each pass gives [B, L, H, T]."""

    def __init__(self, model, pooling: str):
        self.model, self.pooling = model, pooling
        self._interface = None
        self._positions = self._mask = None
        self._rows = []
        can = getattr(model, "_can_set_attn_implementation", None)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self.use_interface = bool(callable(can) and can() and isinstance(impl, str))
        self._impl = impl

    # ---- wrapping the model's attention implementation --------------------------------------------
    def __enter__(self):
        if self.use_interface:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            self._interface = ALL_ATTENTION_FUNCTIONS
            had = self._impl in ALL_ATTENTION_FUNCTIONS._local_mapping
            self._saved = (had, ALL_ATTENTION_FUNCTIONS._local_mapping.get(self._impl))
            original = None if self._impl == "eager" else ALL_ATTENTION_FUNCTIONS[self._impl]
            ALL_ATTENTION_FUNCTIONS._local_mapping[self._impl] = self._wrap(original)
        return self

    def __exit__(self, *exc):
        if self._interface is not None:
            had, fn = self._saved
            if had:
                self._interface._local_mapping[self._impl] = fn
            else:
                self._interface._local_mapping.pop(self._impl, None)
            self._interface = None
        return False

    def _wrap(self, original):
        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            fn = original or getattr(sys.modules[type(module).__module__], "eager_attention_forward")
            out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            if self._positions is not None and query.shape[2] == key.shape[2] == self._mask.shape[1]:
                self._record(query, key, attention_mask, kwargs.get("scaling"))
            return out
        return attention

    def _record(self, query, key, attention_mask, scaling):
        B, H, T, dh = query.shape
        b, pos = torch.arange(B, device=query.device), self._positions.to(query.device)
        q = query[b, :, pos, :]  # [B, H, dh]
        if key.shape[1] != H:  # grouped-query attention: each key head serves H / H_kv query heads
            key = key.repeat_interleave(H // key.shape[1], dim=1)
        s = torch.einsum("bhd,bhtd->bht", q.float(), key.float()) * (dh ** -0.5 if scaling is None else scaling)
        s = s.masked_fill(~self._mask.to(s.device)[:, None, :], float("-inf"))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] == T:
            # the model's own mask row for the reading token (causal, sliding window): bool = may attend, else additive
            row = attention_mask.expand(B, -1, T, -1)[b, :, pos, :]  # [B, 1 or H, T]
            s = s.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else s + row.float()
        self._rows.append(torch.softmax(s, dim=-1))

    # ---- per batch ----------------------------------------------------------------------------------
    def forward_kwargs(self) -> dict:
        return {} if self.use_interface else {"output_attentions": True}

    @contextlib.contextmanager
    def batch(self, mask: torch.Tensor):
        self._mask = mask.bool()
        self._positions = reading_positions(mask, self.pooling)
        self._rows = []
        try:
            yield self
        finally:
            self._positions = None

    def rows(self, outputs) -> Optional[torch.Tensor]:
        """[B, L, H, T] float32 attention rows of the reading token, or None when the pass gave none."""
        if self.use_interface:
            return torch.stack(self._rows, dim=1) if self._rows else None
        att = outputs.get("attentions") if isinstance(outputs, dict) else getattr(outputs, "attentions", None)
        if not att:
            return None
        pos = self._positions.to(att[0].device)
        b = torch.arange(pos.shape[0], device=pos.device)
        return torch.stack([a[b, :, pos, :].float() for a in att], dim=1)


def attention_features(rows: torch.Tensor, mask: torch.Tensor, pooling: str):
    """rows [B, L, H, T], mask [B, T] -> (features [B, 1, L*H]: per-head maximum over the real tokens other
    than the reading token, top [B] int64: the position receiving the most attention, averaged over the heads
    of the upper half of the layers; -1 for an input with no other real token)."""
    content = mask.bool().clone()
    pos = reading_positions(mask, pooling).to(content.device)
    content[torch.arange(content.shape[0], device=content.device), pos] = False
    r = rows.float().masked_fill(~content[:, None, None, :], 0.0)
    maxima = r.amax(dim=-1).flatten(1).unsqueeze(1)
    upper = r[:, r.shape[1] // 2:].mean(dim=(1, 2)).masked_fill(~content, -1.0)
    top = torch.where(content.any(1), upper.argmax(dim=-1), torch.full_like(pos, -1))
    return maxima, top

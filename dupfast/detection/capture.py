"""One forward pass per batch -> pooled per-layer features [B, L, d], logits, and per-token signals.

The hidden states of a batch are pooled the moment the forward returns and then dropped, so at most one
batch's [L, B, T, d] activations ever exist; the [N, L, T, d] tensor of a whole data set never does.

Pooling (`pooling=`):
    "cls"   first real token ([CLS] for BERT-like encoders), correct under left and right padding;
    "last"  last real token (decoder LMs), correct under left and right padding (the attention mask's last 1,
            never position -1 or the pad id);
    "mean"  masked mean over real tokens;
    "auto"  "cls" for known encoders, "mean" for encoder-decoders (encoder then decoder layers, as DUP),
            "last" for everything else (decoder LMs: an open-ended family, encoders are a closed list).
"""
import contextlib
import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..batches import model_device, read_batches
from ..classifier import ENCODER_TYPES, check_classifier, check_head_positions, check_pad_token
from .attention import ATTN, AttentionProbe, attention_features, supported
from .checks import check_finite_rows
from .duplicates import input_keys

POOLINGS = ("cls", "last", "mean")


@dataclasses.dataclass
class CapturedBatch:
    """What one forward pass yields. features: pooling name -> [B, L, d] float32."""
    features: dict
    logits: torch.Tensor                    # [B, C] float32
    labels: Optional[torch.Tensor] = None   # [B] long, when the loader gives them
    index: Optional[torch.Tensor] = None    # [B] long, global sample ids, when the loader gives them
    token: Optional[torch.Tensor] = None    # whatever `token_fn` returned for this batch
    keys: Optional[torch.Tensor] = None     # [B] int64 hash of the real token ids (duplicates.input_keys)
    top_tokens: Optional[torch.Tensor] = None  # [B] int64 token id the reading token attends most (-1: none)


def resolve_pooling(model, pooling: str = "auto") -> str:
    if pooling != "auto":
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} or 'auto', not {pooling!r}")
        return pooling
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("pooling='auto' needs a model with a HF `config`; pass pooling='cls', 'last' or 'mean'")
    if getattr(config, "is_encoder_decoder", False):
        return "mean"
    return "cls" if getattr(config, "model_type", None) in ENCODER_TYPES else "last"


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the first real token per row (0 under right padding)."""
    return mask.long().argmax(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token per row, for left AND right padding (DUP's mask.sum()-1 assumes
    right padding and picks a pad token under left padding)."""
    T = mask.shape[1]
    return T - 1 - mask.long().flip(1).argmax(dim=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [B, T, d], mask [B, T] -> [B, d] float32."""
    if how == "mean":
        # [B, 1, T] @ [B, T, d]: the masked sum without a [B, T, d] product in memory; the count in fp32
        # (bf16 holds integers exactly only up to 256)
        total = torch.bmm(mask.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1).float()
        return total / mask.sum(1, keepdim=True).clamp_min(1).float()
    pos = first_token_index(mask) if how == "cls" else last_token_index(mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos].float()


def hidden_layers(outputs) -> list:
    """The transformer-layer outputs of a forward (embedding output excluded); encoder-decoders give
    encoder layers then decoder layers, as DUP does for BART/T5."""
    get = (lambda k: outputs.get(k)) if isinstance(outputs, dict) else (lambda k: getattr(outputs, k, None))
    hs = get("hidden_states")
    if hs is not None:
        return list(hs[1:])
    enc, dec = get("encoder_hidden_states"), get("decoder_hidden_states")
    if enc is not None and dec is not None:
        return list(enc[1:]) + list(dec[1:])
    raise ValueError("the model returned no hidden states for output_hidden_states=True; dupfast needs a "
                     "model whose forward accepts output_hidden_states and returns `hidden_states` "
                     "(a HF PreTrainedModel, or a wrapper that forwards the flag)")


def _logits(outputs):
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("the model returned no `logits`; dupfast needs a sequence classifier "
                         "(e.g. AutoModelForSequenceClassification)")
    if logits.dim() != 2:
        raise ValueError(f"the model's logits have shape {tuple(logits.shape)}, not [batch, num_labels]: dupfast "
                         "needs a sequence classifier (e.g. AutoModelForSequenceClassification), not a language "
                         "model's per-token logits")
    return logits


_AUTOCAST = {True: "bf16", "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16",
             "fp16": "fp16", "float16": "fp16", torch.float16: "fp16"}


def autocast_name(autocast) -> Optional[str]:
    """None/False (off), True or "bf16" or torch.bfloat16 -> "bf16", "fp16"/torch.float16 -> "fp16",
    "auto" -> "auto" (bf16 where the device computes it natively, else off: see resolve_autocast)."""
    if autocast is None or autocast is False:
        return None
    if autocast == "auto":
        return "auto"
    try:
        return _AUTOCAST[autocast]
    except (KeyError, TypeError):
        raise ValueError(f"autocast must be None, 'bf16', 'fp16' or 'auto', not {autocast!r}") from None


def native_bf16(device: torch.device) -> bool:
    """bf16 matrix arithmetic in hardware: AMX or AVX512-BF16 on a CPU, bf16 support on a GPU. Without it
    bf16 autocast is emulated and slower than fp32 (measured: 0.55x on a Xeon without either)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from ..ops.mahalanobis import native_bf16_cpu
        return native_bf16_cpu()
    return False


def resolve_autocast(device: torch.device, autocast) -> Optional[str]:
    """The autocast a forward pass on `device` runs under: "auto" becomes "bf16" or None by native_bf16."""
    name = autocast_name(autocast)
    if name == "auto":
        return "bf16" if native_bf16(device) else None
    return name


def autocast_context(device: torch.device, autocast):
    name = resolve_autocast(device, autocast)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


def capture(model, loader: Iterable, poolings: Sequence[str] = ("cls",), autocast=None,
            token_fn: Optional[Callable] = None, need_labels: bool = False, name: Optional[str] = None):
    """Yield one CapturedBatch per loader batch, from ONE forward pass each.

    Batches are read by `dupfast.batches` (any Mapping; token_type_ids only for a model that takes them).
    token_fn(hidden: list of [B, T, d], mask [B, T]) runs while the batch's hidden states are alive; its
    return value lands in `CapturedBatch.token` (per-token signals without keeping token activations).
    need_labels: read (and require) the batches' labels; name: the set's name in error messages.
    ATTN ("attn") among `poolings` adds the reading token's attention signal (attention.py) as features[ATTN]
    [B, 1, L*H] and the top-attended token ids; it reads the first of the other poolings ("cls" or "last").
    """
    want_attn = ATTN in poolings
    poolings = tuple(resolve_pooling(model, p) for p in poolings if p != ATTN)
    probe = None
    if want_attn:
        if not poolings or not supported(model, poolings[0]):
            raise ValueError(f"the attention signal needs a HF classifier read at one token (pooling 'cls' or 'last', "
                             f"not {poolings[:1]}) and no encoder-decoder; drop 'attn' from the detector's signals")
        probe = AttentionProbe(model, poolings[0])
    check_classifier(model, "detection")
    head_pad = check_pad_token(model)  # a decoder's head: the pad id it reads (None: encoders, non-HF modules)
    device = model_device(model)
    amp = resolve_autocast(device, autocast)  # named in the error on NaN/inf outputs
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    n_batches = 0
    try:
        for i, batch in enumerate(read_batches(loader, name, model, need_labels)):
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            check_head_positions(inputs["input_ids"], inputs["attention_mask"], head_pad,
                                 f"{name} batch {i}" if name else f"batch {i}")
            mask = inputs["attention_mask"]
            with torch.inference_mode(), autocast_context(device, autocast), probing(probe, mask):
                outputs = model(**inputs, output_hidden_states=True, return_dict=True,
                                **(probe.forward_kwargs() if probe else {}))
                hidden = hidden_layers(outputs)
                feats = {p: torch.stack([pool(h, mask, p) for h in hidden], dim=1) for p in poolings}
                token = token_fn(hidden, mask) if token_fn is not None else None
                logits = _logits(outputs).float()
                top = None
                if probe is not None:
                    feats[ATTN], top = attention_columns(probe, outputs, mask, poolings[0], len(hidden),
                                                         where_of(name, i))
            del outputs, hidden
            where = f"{name} batch {i}" if name else f"batch {i}"
            for p, f in feats.items():
                check_finite_rows(f, f"hidden states ({p} pooling)", where, amp)
            check_finite_rows(logits, "logits", where, amp)
            n_batches += 1
            keys = input_keys(batch.inputs["input_ids"], batch.inputs["attention_mask"])
            top_ids = None if top is None else torch.where(
                top >= 0, inputs["input_ids"].gather(1, top.clamp_min(0).unsqueeze(1)).squeeze(1), top).cpu()
            yield CapturedBatch(feats, logits, batch.labels, batch.index, token, keys, top_ids)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if n_batches == 0:
        raise ValueError("the loader yielded no batches (empty data set)")


def where_of(name, i) -> str:
    return f"{name} batch {i}" if name else f"batch {i}"


@contextlib.contextmanager
def probing(probe, mask):
    """The probe's context for one batch (nothing without a probe)."""
    if probe is None:
        yield
        return
    with probe, probe.batch(mask):
        yield


def attention_columns(probe, outputs, mask, pooling, n_layers, where):
    """(features[ATTN] [B, 1, L*H], top positions [B]) of one probed forward pass; an error naming the fix when the
    pass gave no attention rows for every layer."""
    rows = probe.rows(outputs)
    if rows is None or rows.shape[1] != n_layers:
        got = 0 if rows is None else rows.shape[1]
        raise ValueError(f"{where}: the attention signal saw {got} attention layers for {n_layers} hidden layers: "
                         "this model's attention is neither dispatched through transformers' AttentionInterface nor "
                         "returned with output_attentions=True; drop 'attn' from the detector's signals")
    return attention_features(rows, mask, pooling)


def collect(batches):
    """Concatenate captured batches: (features dict, logits, labels or None, index or None)."""
    feats, logits, labels, index = {}, [], [], []
    for cb in batches:
        for k, v in cb.features.items():
            feats.setdefault(k, []).append(v)
        logits.append(cb.logits)
        labels.append(cb.labels)
        index.append(cb.index)
    feats = {k: torch.cat(v) for k, v in feats.items()}
    cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
    return feats, torch.cat(logits), cat(labels), cat(index)

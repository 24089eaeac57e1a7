"""Plain supervised fine-tuning of a sequence classifier: the recipe (`FinetuneConfig`) and the loop (`fit`).

Victims (`dupfast.harness.victims`) and BTU's rounds, fine-tune and clean-tune (`dupfast.btu`) all train through
`fit`: AdamW, linear warm-up then decay, gradient clipping, length-sorted shuffled batches.
"""
import dataclasses
import math
import numbers
import os
import random

import torch

from .batches import Rows, forward_inputs
from .batching import RowBatcher, TextBatcher


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    max_len: int = 64            # truncation of texts (token rows from a loader are used as they are)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 2025
    autocast: str | None = None  # "bf16": forward under bf16 autocast (fast where the CPU has native bf16)

    def __post_init__(self):
        name = type(self).__name__
        _check_types(self)
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"{name}.autocast must be None or 'bf16', got {self.autocast!r}")
        for field in ("epochs", "batch_size", "max_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{name}.lr must be a finite number > 0, got {self.lr}")
        if not (0 <= self.warmup_ratio < 1):
            raise ValueError(f"{name}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"{name}.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:  # clip_grad_norm_ with max_norm <= 0 zeroes every step (NaN: every weight)
            raise ValueError(f"{name}.grad_clip must be > 0, got {self.grad_clip}")


def _check_types(cfg) -> None:
    """Every int / float field of its type before any comparison: lr="2e-5" would otherwise fail as "'>' not
    supported between 'str' and 'int'" and epochs=2.0 deep in range(). The rule and message of
    dupfast.purification.config._check_types, not imported from there: that loads the whole purification package
    (triton included, ~1 s), which importing btu or a victim avoids."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type not in (int, float):
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if f.type is int else numbers.Real):
            what = "an int" if f.type is int else "a number"
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be {what}, got {v!r} ({type(v).__name__}), "
                             f"e.g. {f.name}={f.default!r}")


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def _progress(iterable, total, desc):
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, disable=os.environ.get("DUPFAST_QUIET") == "1")
    except ImportError:
        return iterable


def fit(model, tokenizer, train, cfg: FinetuneConfig, desc: str = "train", extra_loss=None):
    """Fine-tune `model` in place on `train`: (text, label) samples, or labelled `dupfast.batches.Rows`
    (token rows collected from a loader). Returns the per-step losses.

    extra_loss(outputs, batch) -> scalar tensor, added to the cross-entropy each step; with it the forward also
    returns every layer's hidden states (an attacker's objective on the features, dupfast.harness.adaptive)."""
    from transformers import get_linear_schedule_with_warmup

    seed_everything(cfg.seed)
    if isinstance(train, Rows):
        batcher = RowBatcher.from_rows(tokenizer, train)
    else:
        batcher = TextBatcher(tokenizer, [s.text for s in train], [s.label for s in train], cfg.max_len)
    takes = forward_inputs(model)
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(len(batcher) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    model.train()
    losses = []
    for epoch in range(cfg.epochs):
        it = batcher.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        for batch in _progress(it, steps_per_epoch, f"{desc} epoch {epoch + 1}/{cfg.epochs}"):
            inputs = {k: batch[k] for k in takes if k in batch}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
                out = model(**inputs, labels=batch["labels"],
                            **({} if extra_loss is None else {"output_hidden_states": True}))
            loss = out.loss if extra_loss is None else out.loss + extra_loss(out, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    return losses

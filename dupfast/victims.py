"""Fine-tune a (possibly backdoored) HF sequence classifier, cached on disk.

The cache key hashes the whole configuration and the training data, so a cached victim is reused only
for exactly the same recipe and never overwritten by a different one.
"""
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import time
from typing import Sequence

import torch

from .data import Sample, fingerprint, validate
from .models import cache_root, load_model, load_tokenizer, model_fingerprint


@dataclasses.dataclass(frozen=True)
class VictimConfig:
    model: str = "minilm"
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    max_len: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 2025

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"VictimConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0):
            raise ValueError(f"VictimConfig.lr must be > 0, got {self.lr}")
        if not (0 <= self.warmup_ratio < 1):
            raise ValueError(f"VictimConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def default_cache_dir() -> pathlib.Path:
    """$DUPFAST_CACHE, else ~/.cache/dupfast; victims go to its victims/ folder."""
    return cache_root()


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def length_sorted_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0):
    """Index batches of similar length (little padding). Training: sort inside shuffled chunks of
    50 batches, then shuffle the batch order, so batches stay random but padding stays small."""
    idx = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(idx)
        chunk = batch_size * 50
        idx = [i for c in range(0, len(idx), chunk) for i in sorted(idx[c:c + chunk], key=lambda j: lengths[j])]
    else:
        idx.sort(key=lambda j: lengths[j])
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


class TextBatcher:
    """Tokenises once, then yields dynamically padded batches (dicts of tensors + `index`)."""

    def __init__(self, tokenizer, texts: Sequence[str], labels=None, max_len: int = 128):
        self.tok = tokenizer
        self.enc = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
        self.labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self):
        return len(self.enc)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        for ids in length_sorted_batches([len(e) for e in self.enc], batch_size, shuffle, seed):
            padded = self.tok.pad({"input_ids": [self.enc[i] for i in ids]}, return_tensors="pt")
            batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                     "index": torch.as_tensor(ids)}
            if self.labels is not None:
                batch["labels"] = self.labels[ids]
            yield batch


def _progress(iterable, total, desc):
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, disable=os.environ.get("DUPFAST_QUIET") == "1")
    except ImportError:
        return iterable


def fit(model, tokenizer, train: Sequence[Sample], cfg: VictimConfig, desc: str = "train"):
    """Plain supervised fine-tuning: AdamW, linear warm-up then decay, gradient clipping."""
    from transformers import get_linear_schedule_with_warmup

    seed_everything(cfg.seed)
    batcher = TextBatcher(tokenizer, [s.text for s in train], [s.label for s in train], cfg.max_len)
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
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
    model.eval()
    return losses


@torch.inference_mode()
def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_len: int = 128) -> torch.Tensor:
    """Logits [N, C] in the input order."""
    model.eval()
    if len(texts) == 0:
        return torch.empty(0, model.config.num_labels)
    batcher = TextBatcher(tokenizer, texts, None, max_len)
    out = None
    for batch in batcher.batches(batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if out is None:
            out = torch.empty(len(batcher), logits.shape[-1])
        out[batch["index"]] = logits
    return out


def predict(model, tokenizer, texts, batch_size: int = 64, max_len: int = 128) -> torch.Tensor:
    return predict_logits(model, tokenizer, texts, batch_size, max_len).argmax(-1)


def evaluate_backdoor(model, tokenizer, test_clean: Sequence[Sample], test_poison: Sequence[Sample],
                      target: int, max_len: int = 128, batch_size: int = 64) -> dict:
    """CACC on the clean test set and ASR on the poisoned one (every sample triggered, true label != target)."""
    from . import metrics

    validate(test_clean, "clean test set", min_classes=1)
    validate(test_poison, "poisoned test set", min_classes=1)
    clean_pred = predict(model, tokenizer, [s.text for s in test_clean], batch_size, max_len)
    poison_pred = predict(model, tokenizer, [s.text for s in test_poison], batch_size, max_len)
    # ASR floor: the share of CLEAN non-target inputs already predicted as the target, i.e. the ASR a model
    # with no backdoor but these errors would show; ASR near it means the trigger no longer does anything
    nontarget = [int(p) == target for p, s in zip(clean_pred, test_clean) if s.label != target]
    return {"cacc": metrics.cacc(clean_pred, [s.label for s in test_clean]),
            "asr": metrics.asr(poison_pred, target),
            "asr_floor": sum(nontarget) / len(nontarget) if nontarget else float("nan"),
            "test_clean_size": len(test_clean), "test_poison_size": len(test_poison)}


def cache_key(cfg: VictimConfig, train: Sequence[Sample], num_labels: int) -> str:
    # the model enters by content, not by name or path: an alias or a moved copy of the same weights is the
    # same victim
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
    payload = {"config": config, "data": fingerprint(train), "num_labels": num_labels,
               "model": model_fingerprint(cfg.model)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def train_victim(train: Sequence[Sample], cfg: VictimConfig = VictimConfig(), cache_dir=None,
                 num_labels: int | None = None, name: str = "victim"):
    """Fine-tune cfg.model on `train` (or load it from the cache). Returns (model, tokenizer, info)."""
    validate(train, "training set")
    labels_needed = max(s.label for s in train) + 1
    num_labels = num_labels or labels_needed
    if num_labels < labels_needed:
        raise ValueError(f"num_labels={num_labels} but the training set has label {labels_needed - 1}")
    cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache / "victims" / f"{name}-{cache_key(cfg, train, num_labels)}"
    info_path = folder / "dupfast_victim.json"
    if info_path.is_file():
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
        model.eval()
        info = json.loads(info_path.read_text())
        info["cached"] = True
        return model, load_tokenizer(folder), info
    seed_everything(cfg.seed)  # the fresh classification head is drawn here: part of "reproducible from a seed"
    model, tok = load_model(cfg.model, num_labels=num_labels)
    t0 = time.perf_counter()
    losses = fit(model, tok, train, cfg, desc=name)
    info = {"name": name, "config": dataclasses.asdict(cfg), "train_size": len(train),
            "poisoned": sum(s.poison_label for s in train), "num_labels": num_labels,
            "train_seconds": round(time.perf_counter() - t0, 1), "final_loss": losses[-1] if losses else None,
            "torch_threads": torch.get_num_threads(), "path": str(folder)}
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "dupfast_victim.json").write_text(json.dumps(info, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another process finished first: keep theirs, never clobber
        import shutil
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    info["cached"] = False
    return model, tok, info

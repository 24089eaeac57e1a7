"""Victims: a (possibly backdoored) HF sequence classifier fine-tuned by `dupfast.finetune.fit`, cached on
disk, and its clean accuracy / attack success rate (`evaluate_backdoor`).

The cache key hashes the whole configuration and the training data, so a cached victim is reused only
for exactly the same recipe and never overwritten by a different one.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Sequence

import torch

from ..batching import predict
from ..samples import Sample, validate
from .data import fingerprint
from ..finetune import FinetuneConfig, fit, seed_everything
from .models import cache_root, load_model, load_tokenizer, model_fingerprint


@dataclasses.dataclass(frozen=True)
class VictimConfig(FinetuneConfig):
    """A victim is a plain fine-tune: a FinetuneConfig recipe and the checkpoint it starts from."""
    model: str = "minilm"        # a short name or HF folder (dupfast.harness.models)


def default_cache_dir() -> pathlib.Path:
    """$DUPFAST_CACHE, else ~/.cache/dupfast; victims go to its victims/ folder."""
    return cache_root()


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
    if config.get("autocast") is None:  # recipes from before the field hash as they did
        config.pop("autocast", None)
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
    extra_loss = None
    if getattr(cfg, "adaptive_lambda", 0):  # an adaptive attacker's victim (harness/adaptive.py)
        from .adaptive import feature_matching_for
        extra_loss = feature_matching_for(cfg, train, model)
    losses = fit(model, tok, train, cfg, desc=name, extra_loss=extra_loss)
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

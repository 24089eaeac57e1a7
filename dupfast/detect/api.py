"""The one-call entry points.

    result = dupfast.detect(model, loader, clean=clean_loader)        # loaders yield Mappings (dupfast.batches)
    result = dupfast.detect(model, loader)                            # no clean set: robust pool calibration
    result = dupfast.detect_texts(model, tokenizer, texts, clean_texts=..., clean_labels=...)
"""
from typing import Optional, Sequence

import torch

from .detector import DetectionResult, Detector


def detect(model, loader, clean=None, mode: str = "default", frr: float = 0.05, detector: Optional[Detector] = None,
           **options) -> DetectionResult:
    """Score every input of `loader` (larger = more suspicious) and flag those above the threshold that
    keeps the false-rejection rate at `frr` on clean data. With `clean` (a loader of clean labelled
    batches) the detector calibrates on it; without, on the pool itself (`Detector.fit_pool`). One
    forward pass per batch of each loader."""
    if detector is not None:
        return detector.score(model, loader)
    det = Detector(mode=mode, frr=frr, **options)
    if clean is None:
        return det.fit_pool(model, loader)
    return det.fit(model, clean).score(model, loader)


def text_loader(tokenizer, texts: Sequence[str], labels=None, batch_size: int = 32, max_len: int = 128):
    """Length-sorted, dynamically padded batches with `index` (position in `texts`) and `labels`."""
    from ..batching import TextBatcher
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if len(texts) == 0:
        raise ValueError("no texts given")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(labels)} labels for {len(texts)} texts")
    return TextBatcher(tokenizer, texts, labels, max_len).batches(batch_size)


def detect_texts(model, tokenizer, texts: Sequence[str], clean_texts: Sequence[str] = None, clean_labels=None,
                 mode: str = "default", frr: float = 0.05, batch_size: int = 32, max_len: int = 128,
                 **options) -> DetectionResult:
    """Text-level convenience: tokenises, batches, runs `detect`, returns results in the order of `texts`."""
    clean = None
    if clean_texts is not None:
        if clean_labels is None:
            raise ValueError("clean_texts need clean_labels (the clean set is labelled)")
        clean = list(text_loader(tokenizer, clean_texts, clean_labels, batch_size, max_len))
    pool = list(text_loader(tokenizer, texts, None, batch_size, max_len))
    return detect(model, pool, clean=clean, mode=mode, frr=frr, **options).sorted_by_index()

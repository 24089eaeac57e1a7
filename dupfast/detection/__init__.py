"""DUP detection: one forward pass per batch, streaming statistics, FRR-calibrated flags.

    dupfast.detect(model, loader, clean=...)   (= dupfast.detection.detect)
    Detector(mode=...).fit(model, clean).score(model, pool)
    StripDetector(frr).fit(model, tokenizer, clean_texts).score(model, tokenizer, texts)
    capture(model, loader, poolings) / collect(...)   the one-pass layer features, for your own scorers
    triggers(texts, flags, model=..., tokenizer=...)   trigger candidates: words of the flagged rows, with evidence
"""
from .api import detect, detect_texts  # noqa: F401
from .capture import capture, collect  # noqa: F401
from .detector import Detector  # noqa: F401
from .result import DetectionResult  # noqa: F401
from .scorers.strip import StripDetector  # noqa: F401
from .texts import text_loader  # noqa: F401
from .triggers import TriggerCandidate, triggers  # noqa: F401

__all__ = ["detect", "detect_texts", "text_loader", "capture", "collect", "Detector", "DetectionResult", "StripDetector",
           "triggers", "TriggerCandidate"]

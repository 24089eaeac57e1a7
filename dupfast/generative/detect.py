"""Detection on prompts: DUP's detector on a causal LM's prompts, calibrated on clean prompts.

    result = dupfast.detect_prompts(model, pool_batches, clean=clean_batches)            # mode="default"
    result = dupfast.detect_prompts(model, pool_batches, clean=clean_batches, mode="dup")
    det = PromptStripDetector().fit(model, tokenizer, clean_prompts); det.score(model, tokenizer, prompts)

One forward pass over the prompts of each set (prompt batches: dupfast.generative.data; a batch's response, if it
has one, is dropped), every layer's last-token and mean-over-prompt states (capture.py), then exactly the
classifiers' machinery: the mode's scorer, the clean calibration split, z-normalisation, fusion and the FRR
threshold (`dupfast.detection.Detector`). There are no class logits here, so the modes read:

    default  class-agnostic per-layer Mahalanobis distances of the last token + the leave-one-out pool-shift
             projections of the last-token and mean features (signals ("agnostic", "proj"))
    dup      the authors' detector exactly: MD over the top-3 Calinski-Harabasz layers (needs the clean prompts'
             task `labels`) + spectral concentration, last token
    dan      class-conditional mean-pooled distances (needs `labels`)
    strip    `PromptStripDetector`: perturbation entropy of the first response token (text level: a tokenizer
             and prompt strings)
"""
from typing import Optional

import torch

from ..detection.detector import Detector
from ..detection.result import DetectionResult
from ..detection.scorers.strip import StripDetector
from .capture import capture_prompts
from .data import chat_batches, check_chat_tokenizer
from .lm import check_causal_lm
from .rows import read_chat

PROMPT_DEFAULTS = {"default": {"signals": ("agnostic", "proj"), "pooling": "last"},
                   "dup": {"pooling": "last"}, "dan": {"pooling": "mean"}}
LABELLED_MODES = ("dup", "dan")


class PromptDetector:
    """A `Detector` over prompt features. fit(model, clean) / score(model, pool); `.detector` is the fitted
    Detector (save / load work as for classifiers)."""

    def __init__(self, mode: str = "default", frr: float = 0.05, batch_size: int = 16, **options):
        if mode == "strip":
            raise ValueError("mode='strip' is text level: use dupfast.generative.PromptStripDetector(frr)"
                             ".fit(model, tokenizer, clean_prompts)")
        if mode not in PROMPT_DEFAULTS:
            raise ValueError(f"unknown mode {mode!r} for prompts; choose one of {sorted(PROMPT_DEFAULTS)} "
                             "(or PromptStripDetector)")
        if mode == "default" and "pred" in tuple(options.get("signals", ())):
            raise ValueError("the 'pred' signal reads a classifier's predicted class; prompts have no class logits: "
                             "use signals from ('agnostic', 'cos', 'ss', 'proj') with 'agnostic'")
        self.mode, self.batch_size = mode, batch_size
        self.detector = Detector(mode=mode, frr=frr, **{**PROMPT_DEFAULTS[mode], **options})

    def fit(self, model, clean) -> "PromptDetector":
        lm = check_causal_lm(model, "detect_prompts")
        rows = read_chat(clean, "clean", lm, need_responses=False, need_labels=self.mode in LABELLED_MODES)
        feats = {}
        for cb in capture_prompts(lm, rows, self.detector.scorer.poolings, self.batch_size, self.detector.autocast):
            for k, v in cb.features.items():
                feats.setdefault(k, []).append(v)
        feats = {k: torch.cat(v) for k, v in feats.items()}
        num_classes = int(rows.labels.max()) + 1 if rows.labels is not None else 1
        if rows.labels is not None and int(rows.labels.min()) < 0:
            raise ValueError("clean labels must be class ids >= 0")
        self.detector.fit_features(feats, rows.labels, index=rows.index, num_classes=num_classes)
        return self

    def score(self, model, loader) -> DetectionResult:
        lm = check_causal_lm(model, "detect_prompts")
        if self.detector.fitted_calibration is None:
            raise RuntimeError("the prompt detector is not fitted: call fit(model, clean) first")
        rows = read_chat(loader, "pool", lm, need_responses=False)
        if self.detector.hidden_size != lm.hidden_size:
            raise ValueError(f"the detector was fitted on a model of hidden size {self.detector.hidden_size}, this "
                             f"one has {lm.hidden_size}")
        return self.detector.score_captured(capture_prompts(lm, rows, self.detector.scorer.poolings, self.batch_size,
                                                            self.detector.autocast))


def detect_prompts(model, loader, clean=None, mode: Optional[str] = None, frr: Optional[float] = None,
                   detector: Optional[PromptDetector] = None, batch_size: int = 16, **options) -> DetectionResult:
    """Score every prompt of `loader` (a causal LM's prompt batches, dupfast.generative.chat_batches) and flag those
    above the threshold that keeps the false-rejection rate at `frr` (0.05) on the clean prompts `clean`. The
    sibling of `dupfast.detect` for generative models; result.index holds the batches' ids, result.logits is None."""
    if detector is not None:
        given = [k for k, v in (("clean", clean), ("mode", mode), ("frr", frr)) if v is not None] + list(options)
        if given:
            raise TypeError(f"detect_prompts(detector=...) scores with the fitted detector as it is; {', '.join(given)} "
                            "would be ignored")
        return detector.score(model, loader)
    if clean is None:
        raise ValueError("detect_prompts needs clean prompts (clean=...) to calibrate on: pool-only calibration reads a "
                         "classifier's predicted classes, which a generative model does not have")
    det = PromptDetector(mode or "default", 0.05 if frr is None else frr, batch_size, **options)
    return det.fit(model, clean).score(model, loader)


class PromptStripDetector(StripDetector):
    """STRIP-like baseline for prompts: `repeat` copies of each prompt with half of its words swapped for top
    TF-IDF words of held-out clean prompts, chat-encoded; score = -mean entropy (bits) of the FIRST RESPONSE
    TOKEN's distribution over the copies (a trigger keeps the response's start fixed). Threshold: the (1 - frr)
    percentile of the clean validation part, as StripDetector."""

    def __init__(self, frr: float = 0.05, repeat: int = 5, swap_ratio: float = 0.5, seed: int = 2025,
                 calibration_fraction: float = 0.5, batch_size: int = 16, system: Optional[str] = None):
        super().__init__(frr, repeat, swap_ratio, seed, calibration_fraction, batch_size)
        self.system = system

    @torch.inference_mode()
    def scores(self, model, tokenizer, texts) -> torch.Tensor:
        lm = check_causal_lm(model, "PromptStripDetector")
        check_chat_tokenizer(tokenizer)
        perturbed = [self.perturb(t) for t in texts for _ in range(self.repeat)]
        rows = read_chat(chat_batches(tokenizer, perturbed, batch_size=self.batch_size, system=self.system),
                         "perturbed", lm, need_responses=False)
        logits = torch.cat([cb.logits for cb in capture_prompts(lm, rows, ("last",), self.batch_size,
                                                                first_token_logits=True)])
        p = logits.double().softmax(-1)
        ent = -(p * torch.log2(p.clamp_min(1e-300))).sum(-1)
        return -ent.view(len(texts), self.repeat).mean(1)

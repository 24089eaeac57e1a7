"""STRIP (methods.md §3.2), text-level: the mean prediction entropy under word swaps with the top TF-IDF
words of held-out clean texts. It perturbs texts and reads only predictions, so it is its own detector
over texts, not a feature scorer; it shares the harness's seeded split and FRR threshold rule.

    det = StripDetector(frr=0.05).fit(model, tokenizer, clean_texts)
    result = det.score(model, tokenizer, texts)              # a DetectionResult (one component, "strip")
"""
import random

import numpy as np
import torch

from ..calibration import frr_threshold
from ..result import DetectionResult
from ..texts import check_texts, positive_int


class StripDetector:
    """score = -mean entropy (bits) of the prediction over `repeat` perturbed copies, so larger = more
    suspicious; threshold at the (1 - frr) percentile of the clean validation part. (DUP's copy averages
    entropies after a reshape that mixes samples; this averages per sample.)"""

    def __init__(self, frr: float = 0.05, repeat: int = 5, swap_ratio: float = 0.5, seed: int = 2025,
                 calibration_fraction: float = 0.5, batch_size: int = 64, max_len: int = 128):
        if isinstance(frr, bool) or not isinstance(frr, (int, float)) or not 0 < frr < 1:
            raise ValueError(f"frr must lie in (0, 1), got {frr!r}")
        if not 0 < swap_ratio <= 1:
            raise ValueError(f"swap_ratio must lie in (0, 1], got {swap_ratio}")
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
        self.frr, self.repeat, self.swap_ratio, self.seed = frr, positive_int("repeat", repeat), swap_ratio, seed
        self.calibration_fraction = calibration_fraction
        self.batch_size, self.max_len = positive_int("batch_size", batch_size), positive_int("max_len", max_len)
        self.threshold = None

    def fit(self, model, tokenizer, clean_texts) -> "StripDetector":
        """First part of the shuffled clean texts -> TF-IDF replacement words; the rest -> threshold."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        clean_texts = check_texts(clean_texts, "clean texts")
        n = len(clean_texts)
        n_cal = int(round(n * self.calibration_fraction))
        need = max(2, int(np.ceil(1 / self.frr)))
        if n_cal < 1 or n - n_cal < need:
            raise ValueError(f"STRIP needs >= 1 text for TF-IDF and >= {need} for the threshold; got {n} clean texts")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        cal = [clean_texts[i] for i in perm[:n_cal]]
        val = [clean_texts[i] for i in perm[n_cal:]]
        tv = TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")
        try:
            tfidf = tv.fit_transform(cal).toarray()
        except ValueError as exc:  # sklearn: "empty vocabulary; perhaps the documents only contain stop words"
            raise ValueError(f"STRIP found no replacement words in the {n_cal} clean texts it draws them from "
                             f"({exc})") from None
        self.words = tv.get_feature_names_out()
        self.order = np.argsort(-tfidf, axis=-1)
        self.rng = random.Random(self.seed)
        self.threshold = frr_threshold(self.scores(model, tokenizer, val), self.frr)
        return self

    def perturb(self, text: str) -> str:
        words = text.split()
        if not words:
            return text
        m = int(len(words) * self.swap_ratio)
        piece = self.rng.randrange(self.order.shape[0])
        for i in range(m):
            words[self.rng.randrange(len(words))] = self.words[self.order[piece][i % self.order.shape[1]]]
        return " ".join(words)

    @torch.inference_mode()
    def scores(self, model, tokenizer, texts) -> torch.Tensor:
        """[N] float64 STRIP scores of `texts` (draws from the detector's perturbation stream)."""
        from ...batching import predict_logits
        perturbed = [self.perturb(t) for t in texts for _ in range(self.repeat)]
        probs = predict_logits(model, tokenizer, perturbed, self.batch_size, self.max_len).double().softmax(-1)
        ent = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)
        return -ent.view(len(texts), self.repeat).mean(1)

    def score(self, model, tokenizer, texts) -> DetectionResult:
        if self.threshold is None:
            raise RuntimeError("StripDetector is not fitted: call fit() first")
        s = self.scores(model, tokenizer, check_texts(texts, "texts"))
        if not torch.isfinite(s).all():
            raise ValueError("STRIP scores are NaN or inf: the model's predictions are not finite")
        return DetectionResult(scores=s, flags=s > self.threshold, threshold=self.threshold,
                               components=s.unsqueeze(1), component_names=("strip",), selected_layers=[],
                               index=torch.arange(len(s)), weights=(1.0,))

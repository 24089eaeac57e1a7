"""Baselines in the same harness (same split, z-normalisation and FRR threshold as `Detector`).

    Detector(mode="dan")                  DAN (methods.md §3.1): mean-pooled features of every layer,
                                          class means + one tied ShrunkCovariance per layer, squared MD
                                          min over classes, each layer z-normalised, mean over layers.
    StripDetector(frr).fit(model, tok, clean_texts, clean_labels).score(texts)
                                          STRIP (methods.md §3.2): mean prediction entropy under word
                                          swaps with top TF-IDF words of held-out clean texts.
"""
import random

import numpy as np
import torch

from .scorers import fit_stats, gaussian
from .scores import frr_threshold, layer_distances
from .stats import SHRINKAGE


class DanScorer:
    """DAN's score: one component per layer (squared class-conditional MD, min over classes), each
    z-normalised on clean validation, averaged with equal weights."""

    name = "dan"

    def __init__(self, pooling: str = "mean", shrinkage: float = SHRINKAGE, **_ignored):
        # DAN pools by the masked mean over tokens, whatever the model family
        self.pooling, self.shrinkage = "mean" if pooling == "auto" else pooling, shrinkage
        self.means = self.whiteners = None
        self.layers = None

    poolings = property(lambda self: (self.pooling,))
    component_names = property(lambda self: tuple(f"layer{l}" for l in self.layers))
    weights = property(lambda self: tuple(1.0 / len(self.layers) for _ in self.layers))

    def fit(self, feats, labels, num_classes):
        if labels is None:
            raise ValueError("DAN fits class-conditional statistics; the clean loader must yield `labels`")
        st = fit_stats(feats[self.pooling], labels, num_classes)
        if st.present_classes().numel() < 1:
            raise ValueError("DAN needs at least one class in the calibration set")
        self.means, self.whiteners = gaussian(st, True, self.shrinkage)
        self.layers = list(range(st.num_layers))
        return self

    def components(self, feats, logits=None):
        d2 = layer_distances(feats[self.pooling], self.means, self.whiteners, squared=True)  # min over classes
        return d2.double(), {"layer_distances": d2}

    def state(self):
        return ({"means": self.means, "whiteners": self.whiteners},
                {"pooling": self.pooling, "shrinkage": self.shrinkage, "layers": self.layers})

    @classmethod
    def from_state(cls, tensors, meta):
        s = cls(meta["pooling"], meta["shrinkage"])
        s.means, s.whiteners, s.layers = tensors["means"], tensors["whiteners"], list(meta["layers"])
        return s


# ---- STRIP -----------------------------------------------------------------------------------------

class StripDetector:
    """STRIP for text. score = -mean entropy (bits) of the prediction over `repeat` perturbed copies,
    so larger = more suspicious; threshold at the (1 - frr) percentile of the clean validation half.
    (DUP's copy averages entropies after a reshape that mixes samples; this averages per sample.)"""

    def __init__(self, frr: float = 0.05, repeat: int = 5, swap_ratio: float = 0.5, seed: int = 2025,
                 calibration_fraction: float = 0.5, batch_size: int = 64, max_len: int = 128):
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        if not 0 < swap_ratio <= 1:
            raise ValueError(f"swap_ratio must lie in (0, 1], got {swap_ratio}")
        self.frr, self.repeat, self.swap_ratio, self.seed = frr, repeat, swap_ratio, seed
        self.calibration_fraction, self.batch_size, self.max_len = calibration_fraction, batch_size, max_len
        self.threshold = None

    def fit(self, model, tokenizer, clean_texts):
        """First part of the shuffled clean texts -> TF-IDF replacement words; the rest -> threshold."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        n = len(clean_texts)
        n_cal = int(round(n * self.calibration_fraction))
        need = max(2, int(np.ceil(1 / self.frr)))
        if n_cal < 1 or n - n_cal < need:
            raise ValueError(f"STRIP needs >= 1 text for TF-IDF and >= {need} for the threshold; got {n} clean texts")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        cal = [clean_texts[i] for i in perm[:n_cal]]
        val = [clean_texts[i] for i in perm[n_cal:]]
        tv = TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")
        tfidf = tv.fit_transform(cal).toarray()
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
        from ..batching import predict_logits
        perturbed = [self.perturb(t) for t in texts for _ in range(self.repeat)]
        probs = predict_logits(model, tokenizer, perturbed, self.batch_size, self.max_len).double().softmax(-1)
        ent = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)
        return -ent.view(len(texts), self.repeat).mean(1)

    def score(self, model, tokenizer, texts):
        if self.threshold is None:
            raise RuntimeError("StripDetector is not fitted: call fit() first")
        s = self.scores(model, tokenizer, texts)
        return s, s > self.threshold

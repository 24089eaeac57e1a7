"""mode="dup": the authors' detector (DUP `MSDefender`, methods.md §1.3), exactly.

MD = mean over the top-k Calinski-Harabasz layers of the class-agnostic Mahalanobis distance
(ShrunkCovariance 0.1, pooled [CLS] / last token); SS = σ1/Σσ of the consecutive-layer difference matrix
over all layers; fused as α·z(MD) + (1-α)·z(SS).
"""
from typing import Optional

import torch

from ..stats import SHRINKAGE
from .base import BatchScores, Dims, Scorer, expect, need, need_layers
from .common import ch_layers, check_shrinkage, fit_stats, gaussian, layer_distances, transitions


class DupScorer(Scorer):
    name = "dup"
    component_names = ("md", "ss")

    def __init__(self, pooling: str = "auto", top_k: int = 3, alpha: float = 0.9, shrinkage: float = SHRINKAGE):
        super().__init__(pooling)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be >= 1 (an integer), got {top_k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
        self.top_k, self.alpha, self.shrinkage = top_k, alpha, check_shrinkage(shrinkage)
        self.means = self.whiteners = None  # [L, 1, d], [L, d, d]
        self.ch: Optional[torch.Tensor] = None  # [L] Calinski-Harabasz per layer (None with one class)

    @property
    def weights(self):
        return (self.alpha, 1 - self.alpha)

    def fit(self, features, labels, num_classes):
        if labels is None:
            raise ValueError("mode='dup' ranks layers by Calinski-Harabasz against the clean labels; the clean "
                             "loader must yield `labels`")
        st = fit_stats(features[self.pooling], labels, num_classes)
        self.means, self.whiteners = gaussian(st, False, self.shrinkage)
        self.layers, ch = ch_layers(st, self.top_k)
        self.ch = None if ch is None else ch.float()
        return self

    def score(self, features, logits=None):
        x = features[self.pooling]
        dist = layer_distances(x, self.means, self.whiteners)  # [N, L], all layers for analysis
        md = dist[:, self.layers].double().mean(1)
        _, cosines, conc = transitions(x)
        return BatchScores(torch.stack([md, conc.double()], 1), layer_distances=dist, cosines=cosines,
                           concentration=conc)

    def state(self):
        tensors = {"means": self.means, "whiteners": self.whiteners}
        if self.ch is not None:
            tensors["ch"] = self.ch
        meta = {"pooling": self.pooling, "top_k": self.top_k, "alpha": self.alpha, "shrinkage": self.shrinkage,
                "layers": self.layers}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors, meta, dims: Dims):
        s = cls(need(meta, "pooling", str), need(meta, "top_k", int), need(meta, "alpha", (int, float)),
                need(meta, "shrinkage", (int, float)))
        L, d = dims.num_layers, dims.hidden_size
        s.means, s.whiteners = expect(tensors, "means", (L, 1, d)), expect(tensors, "whiteners", (L, d, d))
        s.ch = expect(tensors, "ch", (L,)) if "ch" in tensors else None
        s.layers = need_layers(meta, "layers", L)
        return s

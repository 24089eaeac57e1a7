"""mode="dan": the DAN baseline (methods.md §3.1) in the detector's harness (same split, z-normalisation
and FRR threshold as every mode).

Mean-pooled features of every layer, class means + one tied ShrunkCovariance per layer; one column per
layer, the squared class-conditional Mahalanobis distance, min over classes; each column z-normalised on
the clean validation half, averaged with equal weights.
"""
from ..stats import SHRINKAGE
from .base import BatchScores, Dims, Scorer, expect, need, need_layers
from .common import check_shrinkage, fit_stats, gaussian, layer_distances


class DanScorer(Scorer):
    name = "dan"
    auto_pooling = "mean"  # DAN pools by the masked mean over tokens, whatever the model family

    def __init__(self, pooling: str = "auto", shrinkage: float = SHRINKAGE):
        super().__init__(pooling)
        self.shrinkage = check_shrinkage(shrinkage)
        self.means = self.whiteners = None  # [L, K, d], [L, d, d]

    component_names = property(lambda self: tuple(f"layer{l}" for l in self.layers))
    weights = property(lambda self: tuple(1.0 / len(self.layers) for _ in self.layers))

    def fit(self, features, labels, num_classes):
        if labels is None:
            raise ValueError("DAN fits class-conditional statistics; the clean loader must yield `labels`")
        st = fit_stats(features[self.pooling], labels, num_classes)
        if st.present_classes().numel() < 1:
            raise ValueError("DAN needs at least one class in the calibration set")
        self.means, self.whiteners = gaussian(st, True, self.shrinkage)
        self.layers = list(range(st.num_layers))
        return self

    def score(self, features, logits=None):
        d2 = layer_distances(features[self.pooling], self.means, self.whiteners, squared=True)  # min over classes
        return BatchScores(d2.double(), layer_distances=d2)

    def state(self):
        return ({"means": self.means, "whiteners": self.whiteners},
                {"pooling": self.pooling, "shrinkage": self.shrinkage, "layers": self.layers})

    @classmethod
    def from_state(cls, tensors, meta, dims: Dims):
        s = cls(need(meta, "pooling", str), need(meta, "shrinkage", (int, float)))
        L, d = dims.num_layers, dims.hidden_size
        s.means, s.whiteners = expect(tensors, "means", (L, None, d)), expect(tensors, "whiteners", (L, d, d))
        s.layers = need_layers(meta, "layers", L)
        return s

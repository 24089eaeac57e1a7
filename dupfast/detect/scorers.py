"""Scorers: what is fitted on the clean calibration half, and the per-sample score components.

A scorer turns pooled features [N, L, d] (one tensor per pooling it asks for) into score components
[N, m]; the detector z-normalises each component on the clean validation half, fuses them with the
scorer's weights and calibrates the FRR threshold. Fitting goes through `LayerStats` (streaming fp64
sums, all-reduced across ranks), so every scorer is sharding-invariant.
"""
import warnings

import torch

from .scores import layer_distances, select_top_k, transitions
from .stats import SHRINKAGE, LayerStats, calinski_harabasz, shrunk_covariance, whiteners

FIT_CHUNK = 256  # rows per LayerStats.update when fitting from features already in memory


def fit_stats(x: torch.Tensor, labels, num_classes: int) -> LayerStats:
    """Streaming fp64 statistics of x [N, L, d] (chunk by chunk), summed over ranks."""
    st = LayerStats(x.shape[1], x.shape[2], num_classes)
    for i in range(0, x.shape[0], FIT_CHUNK):
        st.update(x[i:i + FIT_CHUNK], None if labels is None else labels[i:i + FIT_CHUNK])
    return st.all_reduce()


def gaussian(st: LayerStats, class_conditional: bool, shrinkage: float = SHRINKAGE):
    """(means [L, K, d], whiteners [L, d, d]): one class-agnostic Gaussian (K = 1), or class means with
    one tied covariance fitted on class-centred features (DAN's estimator)."""
    if class_conditional:
        present = st.present_classes()
        return st.class_means()[:, present].float(), whiteners(shrunk_covariance(st.covariance(True), shrinkage)).float()
    return st.mean().unsqueeze(1).float(), whiteners(shrunk_covariance(st.covariance(), shrinkage)).float()


def ch_layers(st: LayerStats, top_k: int):
    """DUP's layer selection: top-k layers by Calinski-Harabasz of the calibration features against the
    true labels. With one class CH is undefined: warn and use every layer."""
    try:
        ch = calinski_harabasz(st)
    except ValueError as exc:
        warnings.warn(f"{exc}; using all {st.num_layers} layers instead of the top-{top_k} by CH", stacklevel=3)
        return list(range(st.num_layers)), None
    return select_top_k(ch, min(top_k, st.num_layers)), ch


class DupScorer:
    """The authors' detector (DUP `MSDefender`, methods.md §1.3), exactly:
    MD = mean over the top-k CH layers of the class-agnostic Mahalanobis distance (ShrunkCovariance 0.1,
    pooled [CLS]/last token), SS = σ1/Σσ of the consecutive-layer difference matrix over all layers;
    fused as α·z(MD) + (1-α)·z(SS)."""

    name = "dup"
    component_names = ("md", "ss")

    def __init__(self, pooling: str = "auto", top_k: int = 3, alpha: float = 0.9, shrinkage: float = SHRINKAGE):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.pooling, self.top_k, self.alpha, self.shrinkage = pooling, top_k, alpha, shrinkage
        self.means = self.whiteners = None
        self.layers = None
        self.ch = None

    @property
    def poolings(self):
        return (self.pooling,)

    @property
    def weights(self):
        return (self.alpha, 1 - self.alpha)

    def fit(self, feats: dict, labels, num_classes: int):
        if labels is None:
            raise ValueError("mode='dup' ranks layers by Calinski-Harabasz against the clean labels; the clean "
                             "loader must yield `labels`")
        st = fit_stats(feats[self.pooling], labels, num_classes)
        self.means, self.whiteners = gaussian(st, False, self.shrinkage)
        self.layers, ch = ch_layers(st, self.top_k)
        self.ch = None if ch is None else ch.float()
        return self

    def components(self, feats: dict, logits=None):
        x = feats[self.pooling]
        dist = layer_distances(x, self.means, self.whiteners)            # [N, L], all layers for analysis
        md = dist[:, self.layers].double().mean(1)
        _, cosines, conc = transitions(x)
        comps = torch.stack([md, conc.double()], 1)
        return comps, {"layer_distances": dist, "cosines": cosines, "concentration": conc}

    # ---- saved state ----------------------------------------------------------------------------
    def state(self):
        tensors = {"means": self.means, "whiteners": self.whiteners}
        if self.ch is not None:
            tensors["ch"] = self.ch
        meta = {"pooling": self.pooling, "top_k": self.top_k, "alpha": self.alpha, "shrinkage": self.shrinkage,
                "layers": self.layers}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors, meta):
        s = cls(meta["pooling"], meta["top_k"], meta["alpha"], meta["shrinkage"])
        s.means, s.whiteners, s.layers = tensors["means"], tensors["whiteners"], list(meta["layers"])
        s.ch = tensors.get("ch")
        return s


SIGNALS = ("pred", "agnostic", "cos", "ss")


class DefaultScorer:
    """dupfast's default (chosen by measurement, see experiments/sst2_detection.py and the README):

    pred      per layer, squared Mahalanobis distance of the pooled feature to the clean mean of the class
              the model PREDICTS (class means + one tied ShrunkCovariance per layer, fitted on the clean
              labels). A triggered input is pushed to the target class by the last layers while its
              earlier layers still look like its true class: distance to the predicted class sees both
              "far from every class" (≥ DAN's min over classes) and "looks like another class";
    agnostic  per layer, DUP's class-agnostic distance;
    cos       the consecutive-layer cosine profile [L-1] from the layer Gram, scored by its own
              class-agnostic Gaussian (one Mahalanobis distance over L-1 dims);
    ss        DUP's spectral concentration.
    Each signal's columns are z-normalised on the clean validation half and averaged (every layer counts,
    no label-based layer selection); signals are then summed with `signal_weights`."""

    name = "default"

    def __init__(self, pooling: str = "auto", signals=("pred",), signal_weights=None, shrinkage: float = SHRINKAGE,
                 **_ignored):
        bad = [s for s in signals if s not in SIGNALS]
        if bad or not signals:
            raise ValueError(f"signals must be a non-empty subset of {SIGNALS}, got {list(signals)}")
        self.pooling, self.signals, self.shrinkage = pooling, tuple(signals), shrinkage
        self.signal_weights = tuple(float(w) for w in (signal_weights or [1.0] * len(self.signals)))
        if len(self.signal_weights) != len(self.signals):
            raise ValueError(f"{len(self.signals)} signals but {len(self.signal_weights)} signal_weights")
        self.tensors = {}
        self.num_layers = None
        self.layers = None

    poolings = property(lambda self: (self.pooling,))

    def _columns(self):
        L = self.num_layers
        return {"pred": [f"pred{l}" for l in range(L)], "agnostic": [f"agnostic{l}" for l in range(L)],
                "cos": ["cos"], "ss": ["ss"]}

    @property
    def component_names(self):
        cols = self._columns()
        return tuple(c for s in self.signals for c in cols[s])

    @property
    def weights(self):
        cols = self._columns()
        return tuple(w / len(cols[s]) for s, w in zip(self.signals, self.signal_weights) for _ in cols[s])

    def fit(self, feats: dict, labels, num_classes: int):
        x = feats[self.pooling]
        self.num_layers = x.shape[1]
        self.layers = list(range(self.num_layers))
        t = {}
        if "pred" in self.signals:
            if labels is None:
                raise ValueError("the 'pred' signal fits class means on clean labels; the clean loader must yield `labels`")
            st = fit_stats(x, labels, num_classes)
            t["class_means"], t["class_whiteners"] = gaussian(st, True, self.shrinkage)
            t["classes"] = st.present_classes()
        if "agnostic" in self.signals:
            st = fit_stats(x, None, 0)
            t["means"], t["whiteners"] = gaussian(st, False, self.shrinkage)
        if "cos" in self.signals:
            _, cos, _ = transitions(x)
            st = fit_stats(cos.unsqueeze(1), None, 0)
            t["cos_mean"], t["cos_whitener"] = gaussian(st, False, self.shrinkage)
        self.tensors = t
        return self

    def components(self, feats: dict, logits=None):
        x = feats[self.pooling]
        t, cols, extra = self.tensors, [], {}
        _, cosines, conc = transitions(x)
        extra.update(cosines=cosines, concentration=conc)
        for s in self.signals:
            if s == "pred":
                if logits is None:
                    raise ValueError("the 'pred' signal needs the model's logits")
                d2 = layer_distances(x, t["class_means"], t["class_whiteners"], reduce="none", squared=True)
                cols.append(predicted_class_distance(d2, logits.argmax(-1).to(d2.device), t["classes"]).double())
                extra["layer_distances"] = d2.min(-1).values
            elif s == "agnostic":
                d = layer_distances(x, t["means"], t["whiteners"])
                cols.append(d.double())
                extra.setdefault("layer_distances", d)
            elif s == "cos":
                cols.append(layer_distances(cosines.unsqueeze(1), t["cos_mean"], t["cos_whitener"]).double())
            else:
                cols.append(conc.double().unsqueeze(1))
        return torch.cat(cols, 1), extra

    def state(self):
        return dict(self.tensors), {"pooling": self.pooling, "signals": list(self.signals), "shrinkage": self.shrinkage,
                                    "signal_weights": list(self.signal_weights), "num_layers": self.num_layers}

    @classmethod
    def from_state(cls, tensors, meta):
        s = cls(meta["pooling"], meta["signals"], meta["signal_weights"], meta["shrinkage"])
        s.tensors, s.num_layers = dict(tensors), meta["num_layers"]
        s.layers = list(range(s.num_layers))
        return s


def predicted_class_distance(d2: torch.Tensor, pred: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """d2 [N, L, Kp] distances to the Kp classes present in calibration (ids `classes`), pred [N] predicted
    class ids -> [N, L] distance to the predicted class; the nearest class when it was never seen."""
    classes = classes.to(pred.device)
    col = (pred.view(-1, 1) == classes.view(1, -1))                      # [N, Kp]
    seen = col.any(1)
    picked = d2.gather(2, col.long().argmax(1).view(-1, 1, 1).expand(-1, d2.shape[1], 1))[..., 0]
    return torch.where(seen.view(-1, 1), picked, d2.min(-1).values)


SCORERS = {"dup": DupScorer, "default": DefaultScorer}

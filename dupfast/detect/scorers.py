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


SIGNALS = ("pred", "agnostic", "cos", "ss", "proj")


class DefaultScorer:
    """dupfast's default, chosen by measurement (experiments/sst2_detection.py, README). Column groups
    (default: pred + proj; cos and ss are optional, they made spurious column selections on poison-free
    and low-poison pools in the SST-2 measurements):

    pred      per layer, squared Mahalanobis distance of the pooled feature to the clean mean of the class
              the model PREDICTS (class means + one tied ShrunkCovariance per layer, fitted on the clean
              labels). A triggered input is pushed to the target class by the last layers while its
              earlier layers still look like its true class: the distance to the predicted class sees both
              "far from every class" (>= DAN's min over classes) and "looks like another class";
    agnostic  per layer, DUP's class-agnostic distance (optional);
    cos       the consecutive-layer cosines from the per-sample layer Gram, each as two columns (+cos and
              -cos: a trigger can make a transition unusually abrupt or unusually smooth);
    ss        DUP's spectral concentration, also two-sided;
    proj      transductive: per layer (and summed over layers), the projection of the sample's whitened
              feature on the direction from the clean mean to the mean of the REST of the pool
              (leave-one-out). Poisoned inputs share one shift (the trigger, the style), so the pool mean
              moves along it and every poisoned input projects high on it. Computed after the pass from
              the pooled features the pass kept ([N, L, d] per pooling in `proj_poolings`: the main
              pooling and the masked mean, which sees whole-sentence shifts such as a style).

    Every column is z-normalised on the clean validation half; the columns are fused with `adaptive`
    weights (scores.excess_weights): a column counts as much as the pool exceeds the clean validation
    half above the clean 95th percentile, beyond a Bonferroni significance floor, which selects layers and
    signals with no labels and no poisoned examples. `weights` (DUP's recipe on the distance columns)
    competes as one more column and is used alone when no column shows a significant excess."""

    name = "default"
    adaptive = True

    def __init__(self, pooling: str = "auto", signals=("pred", "proj"), proj_poolings=("main", "mean"),
                 shrinkage: float = SHRINKAGE, **_ignored):
        bad = [s for s in signals if s not in SIGNALS]
        if bad or not signals or not ({"pred", "agnostic"} & set(signals)):
            raise ValueError(f"signals must be a subset of {SIGNALS} with 'pred' or 'agnostic', got {list(signals)}")
        if "proj" in signals and not proj_poolings:
            raise ValueError("the 'proj' signal needs at least one pooling in proj_poolings")
        self.pooling, self.signals, self.shrinkage = pooling, tuple(signals), shrinkage
        self._proj_poolings = tuple(proj_poolings)
        self.tensors = {}
        self.num_layers = None
        self.layers = None
        self.ch_layers = None

    @property
    def proj_poolings(self):
        """Resolved pooling names the transductive projection uses (() without the 'proj' signal)."""
        if "proj" not in self.signals:
            return ()
        out = []
        for p in self._proj_poolings:
            p = self.pooling if p == "main" else p
            if p not in out:
                out.append(p)
        return tuple(out)

    @property
    def poolings(self):
        return tuple(dict.fromkeys((self.pooling,) + self.proj_poolings))

    def _columns(self):
        L = self.num_layers
        return {"pred": [f"pred{l}" for l in range(L)], "agnostic": [f"agnostic{l}" for l in range(L)],
                "cos": [f"+cos{l}" for l in range(L - 1)] + [f"-cos{l}" for l in range(L - 1)],
                "ss": ["+ss", "-ss"]}

    @property
    def component_names(self):
        cols = self._columns()
        return tuple(c for s in self.signals if s != "proj" for c in cols[s])

    @property
    def projection_names(self):
        return tuple(n for p in self.proj_poolings for n in [f"proj-{p}{l}" for l in range(self.num_layers)] + [f"proj-{p}-all"])

    @property
    def weights(self):
        """Fallback weights over component_names (the fixed columns), used when the pool shows no
        significant excess anywhere: DUP's recipe on these columns, 0.9 spread over the distance columns
        of the top-3 Calinski-Harabasz layers (all layers without CH) and 0.1 on +ss when present."""
        names = self.component_names
        dist = [s for s in ("pred", "agnostic") if s in self.signals][0]
        layers = self.layers if self.ch_layers is None else self.ch_layers
        has_ss = "+ss" in names
        w_dist = (0.9 if has_ss else 1.0) / len(layers)
        return tuple(w_dist if n in {f"{dist}{l}" for l in layers} else (0.1 if n == "+ss" else 0.0) for n in names)

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
            self.ch_layers = ch_layers(st, 3)[0]
        if "agnostic" in self.signals:
            st = fit_stats(x, labels, num_classes if labels is not None else 0)
            t["means"], t["whiteners"] = gaussian(st, False, self.shrinkage)
            if self.ch_layers is None and labels is not None:
                self.ch_layers = ch_layers(st, 3)[0]
        for p in self.proj_poolings:
            st = fit_stats(feats[p], None, 0)
            t[f"proj.{p}.means"], t[f"proj.{p}.whiteners"] = gaussian(st, False, self.shrinkage)
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
                cols += [cosines.double(), -cosines.double()]
            elif s == "ss":
                cols += [conc.double().unsqueeze(1), -conc.double().unsqueeze(1)]
        for p in self.proj_poolings:  # ‖z‖² per layer, for the leave-one-out projection
            extra[f"proj_q.{p}"] = layer_distances(feats[p], t[f"proj.{p}.means"], t[f"proj.{p}.whiteners"], squared=True)
        return torch.cat(cols, 1), extra

    def projection_columns(self, per_pooling: dict) -> torch.Tensor:
        """{pooling: [N, L] projections} -> [N, len(projection_names)]: per layer, then their sum."""
        cols = []
        for p in self.proj_poolings:
            cols += [per_pooling[p], per_pooling[p].sum(1, keepdim=True)]
        return torch.cat(cols, 1)

    def state(self):
        return dict(self.tensors), {"pooling": self.pooling, "signals": list(self.signals), "shrinkage": self.shrinkage,
                                    "proj_poolings": list(self.proj_poolings), "num_layers": self.num_layers,
                                    "ch_layers": self.ch_layers}

    @classmethod
    def from_state(cls, tensors, meta):
        s = cls(meta["pooling"], meta["signals"], meta["proj_poolings"], meta["shrinkage"])
        s.tensors, s.num_layers = dict(tensors), meta["num_layers"]
        s.layers = list(range(s.num_layers))
        s.ch_layers = meta.get("ch_layers")
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

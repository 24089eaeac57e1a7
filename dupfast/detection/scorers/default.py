"""mode="default": dupfast's detector, chosen by measurement (experiments/sst2_detection.py, README).

Column groups (default: pred + proj; cos and ss are optional, they made spurious column selections on
poison-free and low-poison pools in the SST-2 measurements):

pred      per layer, squared Mahalanobis distance of the pooled feature to the clean mean of the class the
          model PREDICTS (class means + one tied ShrunkCovariance per layer, fitted on the clean labels).
          A triggered input is pushed to the target class by the last layers while its earlier layers
          still look like its true class: the distance to the predicted class sees both "far from every
          class" (>= DAN's min over classes) and "looks like another class";
agnostic  per layer, DUP's class-agnostic distance (optional);
cos       the consecutive-layer cosines from the per-sample layer Gram, each as two columns (+cos and
          -cos: a trigger can make a transition unusually abrupt or unusually smooth);
ss        DUP's spectral concentration, also two-sided;
attn      the reading token's attention (attention.py): the class-agnostic Mahalanobis distance of the
          per-head maxima of its attention row; a trigger captures that attention. One column. Dropped when
          the model has no reading token (mean pooling, encoder-decoders) or the features lack it.
proj      transductive: per layer (and summed over layers), the projection of the sample's whitened
          feature on the direction from the clean mean to the mean of the REST of the pool (leave-one-out,
          transductive.py). Poisoned inputs share one shift (the trigger, the style), so the pool mean
          moves along it and every poisoned input projects high on it. Computed after the pass from the
          pooled features it kept, for each of `proj_poolings` ("main" = the main pooling, and the masked
          mean, which sees whole-sentence shifts such as a style).

The detector fuses the z-normalised columns with adaptive weights (calibration.fusion): a column counts
as much as the pool exceeds the clean validation half above the clean 95th percentile, beyond a
Bonferroni significance floor. `weights` (DUP's recipe on the distance columns) competes as one more
column and is used alone when no column shows a significant excess.
"""
import torch

from ..attention import ATTN, supported
from ..stats import SHRINKAGE
from ..transductive import loo_projections
from .base import BatchScores, Dims, Scorer, check_pooling, expect, need, need_layers
from .common import ch_layers, check_shrinkage, fit_stats, gaussian, layer_distances, transitions

SIGNALS = ("pred", "agnostic", "cos", "ss", "proj", "attn")
ATTN_WEIGHT = 0.15  # the attention column's share of the fixed combination: experiments/attn_weight_sweep.py
CH_TOP_K = 3  # layers DUP's recipe (the fallback weights) spreads its distance weight over


class DefaultScorer(Scorer):
    name = "default"
    adaptive = True

    def __init__(self, pooling: str = "auto", signals=("pred", "proj", "attn"), proj_poolings=("main", "mean"),
                 shrinkage: float = SHRINKAGE):
        super().__init__(pooling)
        if isinstance(signals, str):
            raise ValueError(f"signals must be a sequence of names, e.g. ('pred', 'proj'), not the string {signals!r}")
        bad = [s for s in signals if s not in SIGNALS]
        if bad or not signals or not ({"pred", "agnostic"} & set(signals)):
            raise ValueError(f"signals must be a subset of {SIGNALS} with 'pred' or 'agnostic', got {list(signals)}")
        if isinstance(proj_poolings, str) or ("proj" in signals and not proj_poolings):
            raise ValueError(f"proj_poolings must be a non-empty sequence of pooling names or 'main', got {proj_poolings!r}")
        for p in proj_poolings:
            if p != "main":
                check_pooling(p)
        self.signals, self.shrinkage = tuple(signals), check_shrinkage(shrinkage)
        self._proj_poolings = tuple(proj_poolings)
        self.tensors = {}
        self.num_layers = None
        self.ch_layers = None

    @property
    def projection_poolings(self):
        """Resolved pooling names the transductive projection uses (() without the 'proj' signal)."""
        if "proj" not in self.signals:
            return ()
        return tuple(dict.fromkeys(self.pooling if p == "main" else p for p in self._proj_poolings))

    @property
    def poolings(self):
        return tuple(dict.fromkeys((self.pooling,) + self.projection_poolings + ((ATTN,) if "attn" in self.signals
                                                                                   else ())))

    def resolve(self, model) -> None:
        super().resolve(model)
        if "attn" in self.signals and not supported(model, self.pooling):
            self.signals = tuple(s for s in self.signals if s != "attn")

    @property
    def component_names(self):
        L = self.num_layers
        cols = {"pred": [f"pred{l}" for l in range(L)], "agnostic": [f"agnostic{l}" for l in range(L)],
                "cos": [f"+cos{l}" for l in range(L - 1)] + [f"-cos{l}" for l in range(L - 1)],
                "ss": ["+ss", "-ss"], "attn": ["attn"]}
        return tuple(c for s in self.signals if s != "proj" for c in cols[s])

    @property
    def projection_names(self):
        return tuple(n for p in self.projection_poolings
                     for n in [f"proj-{p}{l}" for l in range(self.num_layers)] + [f"proj-{p}-all"])

    @property
    def weights(self):
        """Fallback weights over component_names, used when the pool shows no significant excess anywhere:
        DUP's recipe on these columns, 0.9 spread over the distance columns of the top-3 Calinski-Harabasz
        layers (all layers without CH) and 0.1 on +ss when present."""
        names = self.component_names
        dist = [s for s in ("pred", "agnostic") if s in self.signals][0]
        layers = self.layers if self.ch_layers is None else self.ch_layers
        w_rest = 1.0 - (ATTN_WEIGHT if "attn" in names else 0.0)
        w_dist = w_rest * (0.9 if "+ss" in names else 1.0) / len(layers)
        other = {"+ss": 0.1 * w_rest, "attn": ATTN_WEIGHT}
        return tuple(w_dist if n in {f"{dist}{l}" for l in layers} else other.get(n, 0.0) for n in names)

    def drop_missing(self, features: dict) -> None:
        """Features captured without the attention signal (fit_features on older captures): fit without it."""
        if "attn" in self.signals and ATTN not in features:
            self.signals = tuple(s for s in self.signals if s != "attn")

    def fit(self, features, labels, num_classes):
        self.drop_missing(features)
        x = features[self.pooling]
        self.num_layers = x.shape[1]
        self.layers = list(range(self.num_layers))
        self.ch_layers = None
        t = {}
        if "pred" in self.signals:
            if labels is None:
                raise ValueError("the 'pred' signal fits class means on clean labels; the clean loader must yield `labels`")
            st = fit_stats(x, labels, num_classes)
            t["class_means"], t["class_whiteners"] = gaussian(st, True, self.shrinkage)
            t["classes"] = st.present_classes()
            self.ch_layers = ch_layers(st, CH_TOP_K)[0]
        if "agnostic" in self.signals:
            st = fit_stats(x, labels, num_classes if labels is not None else 0)
            t["means"], t["whiteners"] = gaussian(st, False, self.shrinkage)
            if self.ch_layers is None and labels is not None:
                self.ch_layers = ch_layers(st, CH_TOP_K)[0]
        for p in self.projection_poolings:
            st = fit_stats(features[p], None, 0)
            t[f"proj.{p}.means"], t[f"proj.{p}.whiteners"] = gaussian(st, False, self.shrinkage)
        if "attn" in self.signals:
            t["attn.means"], t["attn.whiteners"] = gaussian(fit_stats(features[ATTN], None, 0), False, self.shrinkage)
        self.tensors = t
        return self

    def score(self, features, logits=None):
        x = features[self.pooling]
        t, cols = self.tensors, []
        _, cosines, conc = transitions(x)
        dist = None
        for s in self.signals:
            if s == "pred":
                if logits is None:
                    raise ValueError("the 'pred' signal needs the model's logits")
                d2 = layer_distances(x, t["class_means"], t["class_whiteners"], reduce="none", squared=True)
                cols.append(predicted_class_distance(d2, logits.argmax(-1).to(d2.device), t["classes"]).double())
                dist = d2.min(-1).values  # reported: the pred distances win over the agnostic ones
            elif s == "agnostic":
                d = layer_distances(x, t["means"], t["whiteners"])
                cols.append(d.double())
                dist = d if "pred" not in self.signals else dist
            elif s == "cos":
                cols += [cosines.double(), -cosines.double()]
            elif s == "ss":
                cols += [conc.double().unsqueeze(1), -conc.double().unsqueeze(1)]
            elif s == "attn":
                cols.append(layer_distances(features[ATTN], t["attn.means"], t["attn.whiteners"]).double())
        sq = {p: layer_distances(features[p], t[f"proj.{p}.means"], t[f"proj.{p}.whiteners"], squared=True)
              for p in self.projection_poolings}  # ‖z‖² per layer, for the leave-one-out projection
        return BatchScores(torch.cat(cols, 1), layer_distances=dist, cosines=cosines, concentration=conc, sq_norms=sq)

    def projections(self, pool, validation, weights=None):
        """Per layer, then summed over layers, for each projection pooling (weights: see loo_projections)."""
        per_pool, per_val = [], []
        for p in self.projection_poolings:
            x, q = pool[p]
            a, b = loo_projections(x, q, validation[p], self.tensors[f"proj.{p}.means"],
                                   self.tensors[f"proj.{p}.whiteners"], weights)
            per_pool += [a, a.sum(1, keepdim=True)]
            per_val += [b, b.sum(1, keepdim=True)]
        return torch.cat(per_pool, 1), torch.cat(per_val, 1)

    def state(self):
        return dict(self.tensors), {"pooling": self.pooling, "signals": list(self.signals), "shrinkage": self.shrinkage,
                                    "proj_poolings": list(self.projection_poolings), "num_layers": self.num_layers,
                                    "ch_layers": self.ch_layers,
                                    "attn_dim": (int(self.tensors["attn.means"].shape[-1]) if "attn" in self.signals
                                                 else None)}

    @classmethod
    def from_state(cls, tensors, meta, dims: Dims):
        signals = need(meta, "signals", list)
        s = cls(need(meta, "pooling", str), signals, need(meta, "proj_poolings", list), need(meta, "shrinkage", (int, float)))
        L, d = dims.num_layers, dims.hidden_size
        if need(meta, "num_layers", int) != L:
            raise ValueError(f"scorer.num_layers is {meta['num_layers']}, the detector's num_layers {L}")
        s.num_layers, s.layers = L, list(range(L))
        s.ch_layers = None if meta.get("ch_layers") is None else need_layers(meta, "ch_layers", L)
        shapes = {}
        if "pred" in s.signals:
            shapes.update(class_means=(L, None, d), class_whiteners=(L, d, d), classes=(None,))
        if "agnostic" in s.signals:
            shapes.update(means=(L, 1, d), whiteners=(L, d, d))
        for p in s.projection_poolings:
            shapes.update({f"proj.{p}.means": (L, 1, d), f"proj.{p}.whiteners": (L, d, d)})
        if "attn" in s.signals:
            m = need(meta, "attn_dim", int)
            shapes.update({"attn.means": (1, 1, m), "attn.whiteners": (1, m, m)})
        s.tensors = {k: expect(tensors, k, shape) for k, shape in shapes.items()}
        if "pred" in s.signals:
            classes = s.tensors["classes"]
            if classes.dtype != torch.int64 or classes.numel() != s.tensors["class_means"].shape[1] or \
                    (classes.numel() and (classes.min() < 0 or classes.max() >= dims.num_classes)):
                raise ValueError(f"tensor 'classes' must hold the {s.tensors['class_means'].shape[1]} class ids "
                                 f"(0..{dims.num_classes - 1}) of 'class_means'")
        return s


def predicted_class_distance(d2: torch.Tensor, pred: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """d2 [N, L, Kp] distances to the Kp classes present in calibration (ids `classes`), pred [N] predicted
    class ids -> [N, L] distance to the predicted class; the nearest class when it was never seen."""
    classes = classes.to(pred.device)
    col = (pred.view(-1, 1) == classes.view(1, -1))                      # [N, Kp]
    seen = col.any(1)
    picked = d2.gather(2, col.long().argmax(1).view(-1, 1, 1).expand(-1, d2.shape[1], 1))[..., 0]
    return torch.where(seen.view(-1, 1), picked, d2.min(-1).values)

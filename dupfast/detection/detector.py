"""`Detector`: fit on a clean labelled set (or on the pool itself), score a pool, flag at a fixed FRR.

    det = Detector(frr=0.05).fit(model, clean_loader)      # one forward pass over the clean set
    result = det.score(model, pool_loader)                 # one forward pass over the pool
    det = Detector().fit_pool(model, pool_loader)          # no clean set; det.pool_result: the pool's result
    det.save("det/"); Detector.load("det/")                # safetensors + JSON, checked on load

The detector wires the parts together; each lives in its own module: the capture (capture.py), the
mode's scorer (scorers/), the clean calibration split, z-normalisation, fusion and threshold
(calibration.py), pool-only fitting (pool.py), scoring (scoring.py) and persistence (persistence.py).
`fit*` return the detector; `score*` return a `DetectionResult`.
"""
import warnings
from typing import Optional

from . import persistence
from .calibration import Calibration, calibrate
from .capture import autocast_name, capture, collect
from .checks import check_features, check_logits, check_model
from .fingerprint import check_same_model, model_fingerprint
from .pool import fit_pool
from .result import DetectionResult
from .scorers import check_options, make_scorer
from .scorers.base import Dims
from .scoring import assemble, score_batch, stream_scores
from .transductive import memory_budget
from .verdict import check_fusion, check_rule

OWN_OPTIONS = ("mode", "frr", "seed", "calibration_fraction", "autocast", "pool_trim", "pool_iterations",
               "projection_memory", "threshold", "fusion")


def _fraction(name, value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value < 1)
    if not ok:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return value


class Detector:
    """DUP detection. mode="dup" is the authors' algorithm exactly; mode="default" is dupfast's measured
    improvement (scorers/default.py); mode="dan" the DAN baseline. `options` are the mode's scorer options
    (e.g. pooling, top_k, alpha for "dup"; signals for "default"); any other is a TypeError.
    projection_memory: bytes of pool features mode="default" keeps in memory while scoring (its projection
    needs the whole pool; the budget is shared by its projection poolings); beyond them they go to a temporary file (default $DUPFAST_PROJECTION_MEMORY or
    1 GiB; a run-time choice like `autocast`, not saved with the detector)."""

    def __init__(self, mode: str = "default", frr: float = 0.05, *, seed: int = 2025,
                 calibration_fraction: float = 0.5, autocast=None, pool_trim: float = 0.5,
                 pool_iterations: int = 10, projection_memory: Optional[int] = None,
                 threshold: Optional[str] = None, fusion: str = "auto", **options):
        check_options(mode, options, others=OWN_OPTIONS)
        # where the flags' threshold goes (verdict.py): the pool's clean bulk, or the clean set's percentile
        # (DUP's rule, kept for mode="dup" so it stays the authors' algorithm)
        self.threshold_rule = check_rule(threshold or ("clean" if mode == "dup" else "auto"))
        # mode="default"'s pool-chosen column weights: "auto" only on pools estimated >= verdict.ADAPTIVE_SHARE
        # poisoned, "adaptive" always (dupfast <= 0.x's rule), "fixed" never
        self.fusion_rule = check_fusion(fusion)
        self.mode, self.frr = mode, _fraction("frr", frr)
        self.calibration_fraction = _fraction("calibration_fraction", calibration_fraction)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(pool_iterations, bool) or not isinstance(pool_iterations, int) or pool_iterations < 1:
            raise ValueError(f"pool_iterations must be an int >= 1, got {pool_iterations!r}")
        self.seed, self.pool_trim, self.pool_iterations = seed, _fraction("pool_trim", pool_trim), pool_iterations
        self.autocast = autocast
        self.projection_memory = projection_memory
        self.options = dict(options)
        self.scorer = make_scorer(mode, **options)
        self.fitted_calibration: Optional[Calibration] = None
        self.num_classes = self.num_layers = self.hidden_size = None
        self.pool_result: Optional[DetectionResult] = None  # set by fit_pool: the pool's own scores
        self.model_fingerprint: Optional[dict] = None  # set by fit / fit_pool, checked by score (fingerprint.py)

    # the forward passes' autocast is a run-time choice (also for a loaded detector), so it may be reassigned
    autocast = property(lambda self: self._autocast,
                        lambda self, value: setattr(self, "_autocast", autocast_name(value)))
    projection_memory = property(lambda self: self._projection_memory,
                                 lambda self, value: setattr(self, "_projection_memory", memory_budget(value)))
    threshold = property(lambda self: None if self.fitted_calibration is None else self.fitted_calibration.threshold)
    znorm = property(lambda self: None if self.fitted_calibration is None else self.fitted_calibration.znorm)
    val_z = property(lambda self: None if self.fitted_calibration is None else self.fitted_calibration.val_z)
    calibration = property(lambda self: {} if self.fitted_calibration is None else self.fitted_calibration.info)

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, model, clean_loader) -> "Detector":
        """Fit on a loader of clean labelled batches (one forward pass)."""
        self.scorer.resolve(model)
        feats, logits, labels, index = collect(capture(model, clean_loader, self.scorer.poolings, self.autocast,
                                                       need_labels=True, name="clean"))
        self.fit_features(feats, labels, logits=logits, index=index)
        self.model_fingerprint = model_fingerprint(model)
        return self

    def fit_features(self, features: dict, labels, logits=None, index=None, num_classes=None) -> "Detector":
        """Fit from captured clean features {pooling: [N, L, d]} and their labels [N]."""
        L, d = self._check_fit_features(features)
        if num_classes is None:
            if logits is None:
                raise ValueError("pass num_classes or logits to fit_features")
            num_classes = logits.shape[-1]
        cal = calibrate(self.scorer, features, labels, logits, index, int(num_classes), self.frr, self.seed,
                        self.calibration_fraction)
        self.pool_result = None  # a clean fit replaces an earlier pool fit and its result
        return self._fitted(self.scorer, cal, Dims(L, d, int(num_classes)))

    def fit_pool(self, model, loader) -> "Detector":
        """No clean set: calibrate on the pool itself (one forward pass, pool.py); `pool_result` holds the
        pool's scores (out-of-sample for every sample, which re-scoring with the final fit is not)."""
        self.scorer.resolve(model)
        feats, logits, _, index = collect(capture(model, loader, self.scorer.poolings, self.autocast, name="pool"))
        self.fit_pool_features(feats, logits, index)
        self.model_fingerprint = model_fingerprint(model)
        return self

    def fit_pool_features(self, features: dict, logits, index=None) -> "Detector":
        L, d = self._check_fit_features(features)
        if logits is None:
            raise ValueError("pool calibration needs the model's logits (pseudo-labels for class statistics)")
        pooling = self.scorer.pooling  # resolved: the fresh scorers of each round use the same features
        fitted = fit_pool(lambda: make_scorer(self.mode, **{**self.options, "pooling": pooling}), features, logits,
                          index, logits.shape[-1], self.frr, self.seed, self.calibration_fraction, self.pool_trim,
                          self.pool_iterations)
        self.pool_result = fitted.result
        return self._fitted(fitted.scorer, fitted.calibration, Dims(L, d, logits.shape[-1]))

    def _check_fit_features(self, features):
        if hasattr(self.scorer, "drop_missing") and isinstance(features, dict):
            self.scorer.drop_missing(features)
        L, d = check_features(features, self.scorer.poolings)
        if L < 2:
            raise ValueError("layer-transition scores need at least 2 transformer layers")
        return L, d

    def _fitted(self, scorer, cal: Calibration, dims: Dims) -> "Detector":
        cal.info.setdefault("threshold_rule", self.threshold_rule)
        cal.info.setdefault("fusion", self.fusion_rule)
        self.restore(scorer, cal, dims)
        self.model_fingerprint = None  # features name no model: score skips the check (fit / fit_pool set it)
        msg = cal.small_warning(dims.hidden_size)
        if msg:
            warnings.warn(msg, stacklevel=3)
        return self

    def restore(self, scorer, calibration: Calibration, dims: Dims) -> None:
        """Install a fitted scorer and calibration (fitting and `load` end here)."""
        self.scorer, self.fitted_calibration = scorer, calibration
        self.num_layers, self.hidden_size, self.num_classes = dims.num_layers, dims.hidden_size, dims.num_classes

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, model, loader, *, allow_other_model: bool = False) -> DetectionResult:
        """One forward pass per batch; scores computed batch by batch, features dropped right away. A model other
        than the one of `fit` / `fit_pool` (its fingerprint) is a ValueError unless allow_other_model=True."""
        self._need_fit()
        check_model(model, self.num_classes)
        if not allow_other_model:
            check_same_model(self.model_fingerprint, model)
        return self.score_captured(capture(model, loader, self.scorer.poolings, self.autocast, name="pool"))

    def score_captured(self, batches) -> DetectionResult:
        """Score captured batches (anything with `features`, `logits`, `index`: `capture`'s CapturedBatch) batch
        by batch, as they come: the extension point for other captures (dupfast.generative's prompt capture)."""
        self._need_fit()
        score = lambda cb: self._score_batch(cb.features, cb.logits, cb.index, getattr(cb, "keys", None),  # noqa
                                             getattr(cb, "top_tokens", None))
        return stream_scores(batches, score, self.scorer,
                             self.fitted_calibration, self.projection_memory)

    def score_features(self, features: dict, logits=None, index=None, keys=None) -> DetectionResult:
        """keys [N]: input keys (duplicates.input_keys) so copies count once; None: every row distinct."""
        self._need_fit()
        return assemble([self._score_batch(features, logits, index, keys)], self.scorer, self.fitted_calibration)

    def _score_batch(self, features, logits, index, keys=None, top_tokens=None):
        L, d = check_features(features, self.scorer.poolings)
        if (L, d) != (self.num_layers, self.hidden_size):
            raise ValueError(f"the detector was fitted on {self.num_layers} layers of size {self.hidden_size}, "
                             f"but these features are {L} layers of size {d} (another model?)")
        check_logits(logits, self.num_classes)
        return score_batch(self.scorer, self.fitted_calibration, features, logits, index, keys, top_tokens)

    def _need_fit(self):
        if self.fitted_calibration is None:
            raise RuntimeError("the detector is not fitted: call fit(model, clean_loader) or load() first")

    # ---- persistence (persistence.py) -------------------------------------------------------------
    def save(self, path):
        self._need_fit()
        return persistence.save(self, path)

    @classmethod
    def load(cls, path) -> "Detector":
        return persistence.load(cls, path)

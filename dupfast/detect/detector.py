"""`Detector`: fit on a clean labelled set (or the pool itself), score a pool, flag at a fixed FRR.

    det = Detector(frr=0.05).fit(model, clean_loader)      # one forward pass over the clean set
    result = det.score(model, pool_loader)                 # one forward pass over the pool
    det.save("det/"); Detector.load("det/")                # safetensors + JSON

Calibration protocol (DUP's): the clean set is shuffled with `seed` (2025) and cut in half; the first
half fits the scorer's statistics, the second z-normalises every score component and sets the threshold
at the (1 - frr) percentile of the fused clean scores. Samples are identified by the loader's `index`
key when it has one (required under torch.distributed, so the halves do not depend on sharding), by
position otherwise.
"""
import dataclasses
import json
import math
import pathlib
import warnings
from typing import Optional

import torch

from .. import distributed as D
from .capture import capture, resolve_pooling
from .scorers import DupScorer
from .scores import ZNorm, excess_weights, frr_threshold, fuse
from .transductive import loo_projections

FORMAT_VERSION = 1


@dataclasses.dataclass
class DetectionResult:
    """Per-sample outputs in the loader's order (`index` holds the loader's ids when it gave them)."""
    scores: torch.Tensor                 # [N] float64, larger = more suspicious
    flags: torch.Tensor                  # [N] bool, scores > threshold
    threshold: float
    components: torch.Tensor             # [N, m] z-normalised score components
    component_names: tuple
    selected_layers: list
    layer_distances: Optional[torch.Tensor] = None   # [N, L] per-layer Mahalanobis distances
    transitions: Optional[dict] = None               # {"cosines": [N, L-1], "concentration": [N]}
    logits: Optional[torch.Tensor] = None            # [N, C]
    index: Optional[torch.Tensor] = None             # [N] loader ids
    weights: tuple = ()                              # the fusion weight of each component

    def __len__(self):
        return self.scores.shape[0]

    def sorted_by_index(self) -> "DetectionResult":
        """The same result reordered by `index` (e.g. back to the order of the input texts)."""
        if self.index is None:
            return self
        order = torch.argsort(self.index)
        take = lambda t: None if t is None else t[order]  # noqa: E731
        return dataclasses.replace(
            self, scores=self.scores[order], flags=self.flags[order], components=self.components[order],
            layer_distances=take(self.layer_distances), logits=take(self.logits), index=self.index[order],
            transitions=None if self.transitions is None else {k: v[order] for k, v in self.transitions.items()})


class Detector:
    """DUP detection with dupfast's defaults. mode="dup" is the authors' algorithm exactly;
    mode="default" is dupfast's measured improvement (see scorers.DefaultScorer)."""

    def __init__(self, mode: str = "default", frr: float = 0.05, alpha: float = 0.9, top_k: int = 3,
                 pooling: str = "auto", seed: int = 2025, calibration_fraction: float = 0.5,
                 autocast=None, pool_trim: float = 0.5, pool_iterations: int = 10, **scorer_options):
        if not 0 < frr < 1:
            raise ValueError(f"frr must lie in (0, 1), got {frr}")
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
        self.mode, self.frr, self.seed, self.calibration_fraction = mode, frr, seed, calibration_fraction
        self.val_z: Optional[torch.Tensor] = None  # z-normalised validation components (adaptive thresholds)
        self.val_feats: dict = {}                  # validation pooled features (transductive projection)
        if not 0 < pool_trim < 1 or pool_iterations < 1:
            raise ValueError(f"pool_trim must lie in (0, 1) and pool_iterations be >= 1, got {pool_trim}, {pool_iterations}")
        self.autocast, self.pool_trim, self.pool_iterations = autocast, pool_trim, pool_iterations
        self.scorer = make_scorer(mode, pooling=pooling, top_k=top_k, alpha=alpha, **scorer_options)
        self.znorm: Optional[ZNorm] = None
        self.threshold: Optional[float] = None
        self.num_classes: Optional[int] = None
        self.num_layers = self.hidden_size = None
        self.calibration = {}

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, model, clean_loader) -> "Detector":
        self._resolve_poolings(model)
        feats, logits, labels, index = collect(capture(model, clean_loader, self.scorer.poolings, self.autocast,
                                                          need_labels=True, name="clean"))
        return self.fit_features(feats, labels, logits=logits, index=index)

    def fit_features(self, features: dict, labels, logits=None, index=None, num_classes=None,
                     swap_halves: bool = False) -> "Detector":
        """Fit from captured features (pooling name -> [N, L, d]) of the clean set. swap_halves: the
        validation half calibrates and vice versa (cross-fitting in `fit_pool_features`)."""
        self._check_features(features, fitting=True)
        n_local = next(iter(features.values())).shape[0]
        if num_classes is None:
            if logits is None:
                raise ValueError("pass num_classes or logits to fit_features")
            num_classes = logits.shape[-1]
        self.num_classes = int(num_classes)
        cal, val = self._split(n_local, index)
        if swap_halves:
            cal, val = val, cal
        n_cal = int(D.all_reduce_sum(torch.tensor(float(cal.numel()), dtype=torch.float64)))
        n_val = int(D.all_reduce_sum(torch.tensor(float(val.numel()), dtype=torch.float64)))
        need_val = max(2, math.ceil(1 / self.frr))
        if n_cal < 2 or n_val < need_val:
            raise ValueError(f"the clean set is too small: {n_cal} calibration and {n_val} validation samples; "
                             f"need >= 2 and >= {need_val} (1/frr, to place the {1 - self.frr:.0%} percentile)")
        pick = lambda t, idx: None if t is None else t[idx]  # noqa: E731
        self.scorer.fit({k: v[cal] for k, v in features.items()}, pick(labels, cal), self.num_classes)
        comps, _ = self.scorer.components({k: v[val] for k, v in features.items()}, pick(logits, val))
        self._calibrate(comps)
        # the transductive projection places validation samples on each pool's direction at score time
        self.val_feats = {p: _gather_features(features[p][val]) for p in getattr(self.scorer, "proj_poolings", ())}
        self.calibration = {"calibration_samples": n_cal, "validation_samples": n_val, "source": "clean"}
        return self

    def fit_pool(self, model, loader) -> "DetectionResult":
        """No clean set: calibrate on the pool itself and return its result (one forward pass)."""
        self._resolve_poolings(model)
        feats, logits, _, index = collect(capture(model, loader, self.scorer.poolings, self.autocast, name="pool"))
        return self.fit_pool_features(feats, logits, index)

    def fit_pool_features(self, features: dict, logits, index=None) -> "DetectionResult":
        """Robust calibration on an unlabelled pool, for when no vetted clean set exists.

        Fit on every sample, then repeatedly re-fit on the (1 - pool_trim) least suspicious ones
        (class labels = the model's own predictions) until the retained set stops changing. Every
        decision uses out-of-sample scores: a Gaussian fitted on N ~ d samples scores its own samples far
        lower than new ones, which would make the trimming lock onto whichever half it was fitted on.
        So each round fits twice with the calibration/validation halves swapped (2-fold cross-fitting):
        samples of the calibration half take the swapped fit's score, moved onto this fit's threshold
        scale. The detector keeps the final un-swapped fit; its threshold is the (1 - frr) percentile of
        the retained validation half, so the FRR holds for samples that look clean to the detector.
        Assumes the poisoned share is below pool_trim (with more, the retained set can be the poison)."""
        import copy
        if logits is None:
            raise ValueError("pool calibration needs the model's logits (pseudo-labels for class statistics)")
        n_local = next(iter(features.values())).shape[0]
        if index is None:
            if D.is_sharded():
                raise ValueError("under torch.distributed the loader must yield an `index` key (global sample ids)")
            index = torch.arange(n_local)
        index = torch.as_tensor(index).long()
        labels = logits.argmax(-1)
        keep = torch.ones(n_local, dtype=torch.bool)
        for it in range(1, self.pool_iterations + 1):
            sub = {k: v[keep] for k, v in features.items()}
            ids = _renumber(index[keep])
            swapped = copy.deepcopy(self)
            swapped.fit_features(sub, labels[keep], logits=logits[keep], index=ids, swap_halves=True)
            self.fit_features(sub, labels[keep], logits=logits[keep], index=ids)
            result = self.score_features(features, logits, index)
            cal_rows = torch.nonzero(keep).flatten()[self._split(int(keep.sum()), ids)[0]]
            other = swapped.score_features(features, logits, index)
            result.scores[cal_rows] = other.scores[cal_rows] - other.threshold + result.threshold
            result.flags = result.scores > result.threshold
            cut = torch.quantile(D.all_gather_rows(result.scores), 1 - self.pool_trim).item()
            new_keep = result.scores <= cut
            changed = int(D.all_reduce_sum(torch.tensor(float((new_keep != keep).sum()), dtype=torch.float64)))
            keep = new_keep
            if changed == 0:
                break
        self.calibration.update(source="pool", pool_trim=self.pool_trim, iterations=it,
                                retained=int(D.all_reduce_sum(torch.tensor(float(keep.sum()), dtype=torch.float64))))
        return result

    def _calibrate(self, comps: torch.Tensor):
        """z-normalisers from all ranks' validation components, then the FRR threshold on fused scores."""
        c = comps.double().cpu()
        n = D.all_reduce_sum(torch.tensor(float(c.shape[0]), dtype=torch.float64))
        s1 = D.all_reduce_sum(c.sum(0))
        s2 = D.all_reduce_sum((c ** 2).sum(0))
        self.znorm = ZNorm.from_moments(n, s1, s2)
        self.val_z = D.all_gather_rows(self.znorm(c))
        self.threshold = frr_threshold(fuse(self.val_z, self.scorer.weights), self.frr)

    def _split(self, n_local: int, index):
        """(calibration rows, validation rows) of this rank: a seeded permutation of the global ids 0..N-1,
        first `calibration_fraction` of it calibrates (DUP: random.seed(2025) shuffle, first half)."""
        if index is None:
            if D.is_sharded():
                raise ValueError("under torch.distributed the clean loader must yield an `index` key (global "
                                 "sample ids), so the calibration/validation halves do not depend on sharding")
            index = torch.arange(n_local)
        index = torch.as_tensor(index).long()
        n = int(D.all_reduce_sum(torch.tensor(float(index.numel()), dtype=torch.float64)))
        if index.numel() and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"loader `index` values must be the sample ids 0..{n - 1}, got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        in_cal = torch.zeros(n, dtype=torch.bool)
        in_cal[perm[: int(round(n * self.calibration_fraction))]] = True
        mine = in_cal[index]
        return torch.nonzero(mine).flatten(), torch.nonzero(~mine).flatten()

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, model, loader) -> DetectionResult:
        """One forward pass per batch; scores computed batch by batch, features dropped right away."""
        self._need_fit()
        parts = []
        for cb in capture(model, loader, self.scorer.poolings, self.autocast, name="pool"):
            parts.append(self._score_batch(cb.features, cb.logits, cb.index))
        return _concat(parts, self)

    def score_features(self, features: dict, logits=None, index=None) -> DetectionResult:
        self._need_fit()
        return _concat([self._score_batch(features, logits, index)], self)

    def _score_batch(self, feats, logits, index):
        self._check_features(feats, fitting=False)
        comps, extra = self.scorer.components(feats, logits)
        z = self.znorm(comps.double().cpu())
        proj = {p: (feats[p].detach().cpu(), extra.pop(f"proj_q.{p}").detach().cpu())
                for p in getattr(self.scorer, "proj_poolings", ())}
        return dict(z=z, proj=proj, extra={k: v.detach().cpu() for k, v in extra.items()},
                    logits=None if logits is None else logits.detach().cpu(),
                    index=None if index is None else torch.as_tensor(index).long())

    def projection_components(self, pool: dict):
        """pool: {pooling: (features [N, L, d], ‖z‖² [N, L])} of this rank -> z-normalised projection
        columns (pool [N, m_t], clean validation [n, m_t]); see transductive.py."""
        t = self.scorer.tensors
        per_pool, per_val = {}, {}
        for p, (x, q) in pool.items():
            per_pool[p], per_val[p] = loo_projections(x, q, self.val_feats[p], t[f"proj.{p}.means"],
                                                      t[f"proj.{p}.whiteners"])
        cols_pool, cols_val = self.scorer.projection_columns(per_pool), self.scorer.projection_columns(per_val)
        zn = ZNorm.fit(cols_val)  # validation features are identical on every rank: no reduction needed
        return zn(cols_pool), zn(cols_val)

    def fusion(self, z: torch.Tensor, val_z: torch.Tensor):
        """(weights [m], threshold) for the pool components z [N, m] of this rank. Fixed scorers: their
        weights and the fitted threshold. Adaptive scorers (mode="default"): `scores.excess_weights` from
        the whole pool (counts all-reduced over ranks), threshold re-placed on the clean validation scores
        fused with those weights, so the FRR guarantee is the same."""
        fixed = torch.tensor(self.scorer.weights, dtype=torch.float64)
        fixed = torch.cat([fixed, torch.zeros(z.shape[1] - fixed.numel(), dtype=torch.float64)])
        if not getattr(self.scorer, "adaptive", False):
            return fixed, self.threshold
        # the fixed (DUP-recipe) combination competes as one more column, so a pool whose poison only the
        # combination lifts keeps it, and a column lifted by noise alone cannot outweigh it
        fv, fp = fuse(val_z, fixed), fuse(z, fixed)
        mu, sd = fv.mean(), fv.std(unbiased=False).clamp_min(1e-12)
        val_aug = torch.cat([val_z, ((fv - mu) / sd).unsqueeze(1)], 1)
        pool_aug = torch.cat([z, ((fp - mu) / sd).unsqueeze(1)], 1)
        tau = torch.quantile(val_aug, 1 - self.frr, dim=0)
        val_rate = (val_aug > tau).double().mean(0)
        above = D.all_reduce_sum((pool_aug > tau).double().sum(0))
        n = D.all_reduce_sum(torch.tensor(float(z.shape[0]), dtype=torch.float64))
        wa = excess_weights(above, n.item(), val_rate, val_z.shape[0])
        if wa.sum() == 0:
            return fixed, self.threshold
        w = wa[:-1] + wa[-1] * fixed / sd
        return w, frr_threshold(fuse(val_z, w), self.frr)

    # ---- checks -----------------------------------------------------------------------------------
    def _resolve_poolings(self, model):
        self.scorer.pooling = resolve_pooling(model, self.scorer.pooling)

    def _check_features(self, feats, fitting):
        missing = [p for p in self.scorer.poolings if p not in feats]
        if missing:
            raise ValueError(f"features lack pooling(s) {missing}; this scorer needs {list(self.scorer.poolings)}")
        for p in self.scorer.poolings:
            x = feats[p]
            if x.dim() != 3:
                raise ValueError(f"{p} features must be [N, L, d], got {tuple(x.shape)}")
            if x.shape[0] == 0:
                raise ValueError("no samples: the loader or feature tensor is empty")
            if not torch.isfinite(x).all():
                raise ValueError(f"{p} features contain NaN or inf")
            if fitting:
                self.num_layers, self.hidden_size = x.shape[1], x.shape[2]
            elif (x.shape[1], x.shape[2]) != (self.num_layers, self.hidden_size):
                raise ValueError(f"the detector was fitted on {self.num_layers} layers of size {self.hidden_size}, "
                                 f"but these features are {x.shape[1]} layers of size {x.shape[2]} (another model?)")
        if fitting and self.num_layers < 2:
            raise ValueError("layer-transition scores need at least 2 transformer layers")

    def _need_fit(self):
        if self.threshold is None:
            raise RuntimeError("the detector is not fitted: call fit(model, clean_loader) or load() first")

    # ---- persistence: safetensors + JSON, no pickle ----------------------------------------------
    def save(self, path) -> pathlib.Path:
        from safetensors.torch import save_file
        self._need_fit()
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.scorer.state()
        tensors = {f"scorer.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        tensors["znorm.mean"], tensors["znorm.std"] = self.znorm.mean.contiguous(), self.znorm.std.contiguous()
        tensors["validation.z"] = self.val_z.contiguous()
        for p, x in self.val_feats.items():
            tensors[f"validation.features.{p}"] = x.contiguous()
        save_file(tensors, str(path / "detector.safetensors"))
        info = {"format_version": FORMAT_VERSION, "mode": self.mode, "frr": self.frr, "seed": self.seed,
                "calibration_fraction": self.calibration_fraction, "threshold": self.threshold,
                "num_classes": self.num_classes, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "autocast": None if self.autocast in (None, False) else str(self.autocast),
                "calibration": self.calibration, "scorer": meta}
        (path / "detector.json").write_text(json.dumps(info, indent=2))
        return path

    @classmethod
    def load(cls, path) -> "Detector":
        from safetensors.torch import load_file
        path = pathlib.Path(path)
        for f in ("detector.json", "detector.safetensors"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f} not found: not a saved dupfast detector")
        info = json.loads((path / "detector.json").read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: detector format {info.get('format_version')} is not {FORMAT_VERSION}")
        tensors = load_file(str(path / "detector.safetensors"))
        det = cls.__new__(cls)
        det.mode, det.frr, det.seed = info["mode"], info["frr"], info["seed"]
        det.calibration_fraction, det.threshold = info["calibration_fraction"], info["threshold"]
        det.num_classes, det.num_layers, det.hidden_size = info["num_classes"], info["num_layers"], info["hidden_size"]
        det.autocast, det.calibration = info["autocast"], info["calibration"]
        det.scorer = scorer_class(det.mode).from_state(
            {k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")}, info["scorer"])
        det.znorm = ZNorm(tensors["znorm.mean"], tensors["znorm.std"])
        det.val_z = tensors["validation.z"]
        det.val_feats = {k[len("validation.features."):]: v for k, v in tensors.items()
                         if k.startswith("validation.features.")}
        return det


def _gather_features(x: torch.Tensor) -> torch.Tensor:
    """[n_r, L, d] on each rank -> [n, L, d] everywhere (small: the clean validation half only)."""
    return D.all_gather_rows(x.detach().cpu().reshape(x.shape[0], -1)).reshape(-1, *x.shape[1:])


def _renumber(ids: torch.Tensor) -> torch.Tensor:
    """Map this rank's subset of global ids to 0..M-1 over the subset of all ranks (order-preserving)."""
    every = torch.sort(D.all_gather_rows(ids)).values
    return torch.searchsorted(every, ids)


def scorer_class(mode):
    from .baselines import DanScorer
    from .scorers import SCORERS
    known = {**SCORERS, "dan": DanScorer}
    if mode not in known:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(known)}")
    return known[mode]


def make_scorer(mode, **options):
    return scorer_class(mode)(**options)


def collect(batches):
    """Concatenate captured batches: (features dict, logits, labels or None, index or None)."""
    feats, logits, labels, index = {}, [], [], []
    for cb in batches:
        for k, v in cb.features.items():
            feats.setdefault(k, []).append(v)
        logits.append(cb.logits)
        labels.append(cb.labels)
        index.append(cb.index)
    feats = {k: torch.cat(v) for k, v in feats.items()}
    cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
    return feats, torch.cat(logits), cat(labels), cat(index)


def _concat(parts, det) -> DetectionResult:
    z, val_z = torch.cat([p["z"] for p in parts]), det.val_z
    names = tuple(det.scorer.component_names)
    if parts[0]["proj"]:
        zt, val_zt = det.projection_components({k: (torch.cat([p["proj"][k][0] for p in parts]),
                                                    torch.cat([p["proj"][k][1] for p in parts])) for k in parts[0]["proj"]})
        z, val_z = torch.cat([z, zt], 1), torch.cat([val_z, val_zt], 1)
        names += tuple(det.scorer.projection_names)
    weights, threshold = det.fusion(z, val_z)
    scores = fuse(z, weights)
    extra = {k: torch.cat([p["extra"][k] for p in parts]) for k in parts[0]["extra"]}
    cat = lambda key: None if any(p[key] is None for p in parts) else torch.cat([p[key] for p in parts])  # noqa: E731
    trans = {k: extra[k] for k in ("cosines", "concentration") if k in extra} or None
    return DetectionResult(scores=scores, flags=scores > threshold, threshold=threshold, weights=tuple(weights.tolist()),
                           components=z, component_names=names,
                           selected_layers=list(det.scorer.layers) if det.scorer.layers is not None else [],
                           layer_distances=extra.get("layer_distances"), transitions=trans,
                           logits=cat("logits"), index=cat("index"))

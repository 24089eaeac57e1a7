"""The scorer protocol: what the detector asks of a detection method, and what it gets back.

A scorer turns pooled layer features (one [N, L, d] tensor per pooling it asks for) into raw score
columns. The detector owns everything around it: the capture, the clean calibration/validation split,
z-normalisation, fusion and the FRR threshold (calibration.py), pool-only fitting (pool.py) and
persistence (persistence.py). A scorer declares:

    poolings            the pooled features it reads (resolved names: "cls", "last", "mean")
    component_names     one name per raw column of `score`
    weights             its fixed fusion weights over those columns
    adaptive            whether the detector may re-weight columns from the pool (scores.excess_weights)
    layers              the layers it selected (reported in results)
and implements `fit` (on the labelled clean calibration half), `score` (typed per-batch `BatchScores`), `state`/`from_state` (plain tensors and
JSON, no pickle). A transductive scorer also gives `projection_poolings`, `projection_names` and
`projections` (columns computed from the whole pool after the pass).

Options are the keyword arguments of the scorer's `__init__`, nothing else: `options()` lists them and
the registry (scorers/__init__.py) rejects any other, so a misspelt or foreign option never vanishes.
"""
import abc
import dataclasses
import inspect
from typing import ClassVar, Dict, Optional, Tuple

import torch

from ..capture import POOLINGS, resolve_pooling


@dataclasses.dataclass
class BatchScores:
    """A scorer's output for one batch of B samples."""
    columns: torch.Tensor                           # [B, m] float64 raw score columns, m = len(component_names)
    layer_distances: Optional[torch.Tensor] = None  # [B, L] per-layer Mahalanobis distances (reported)
    cosines: Optional[torch.Tensor] = None          # [B, L-1] consecutive-layer cosines (reported)
    concentration: Optional[torch.Tensor] = None    # [B] DUP's spectral concentration (reported)
    sq_norms: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # pooling -> [B, L] ‖z‖²


class Scorer(abc.ABC):
    """Base of every feature scorer (dup, default, dan). Subclasses set `name` and call
    `super().__init__(pooling)`; their other `__init__` keywords are their options."""

    name: ClassVar[str]
    adaptive: ClassVar[bool] = False
    auto_pooling: ClassVar[Optional[str]] = None  # what pooling="auto" means for this scorer (None: by model)

    def __init__(self, pooling: str = "auto"):
        if pooling != "auto":
            check_pooling(pooling)
        self.pooling = self.auto_pooling if pooling == "auto" and self.auto_pooling else pooling
        self.layers: Optional[list] = None

    @classmethod
    def options(cls) -> Tuple[str, ...]:
        """The keyword options this scorer takes."""
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def resolve(self, model) -> None:
        """Fix pooling='auto' for `model` (the capture needs concrete pooling names)."""
        self.pooling = resolve_pooling(model, self.pooling)

    @property
    def poolings(self) -> Tuple[str, ...]:
        return (self.pooling,)

    @property
    def projection_poolings(self) -> Tuple[str, ...]:
        return ()

    @property
    def projection_names(self) -> Tuple[str, ...]:
        return ()

    @property
    @abc.abstractmethod
    def component_names(self) -> Tuple[str, ...]:
        ...

    @property
    @abc.abstractmethod
    def weights(self) -> Tuple[float, ...]:
        ...

    @abc.abstractmethod
    def fit(self, features: dict, labels: Optional[torch.Tensor], num_classes: int) -> "Scorer":
        """Fit on the calibration half: features {pooling: [n, L, d]}, labels [n] (or None)."""

    @abc.abstractmethod
    def score(self, features: dict, logits: Optional[torch.Tensor] = None) -> BatchScores:
        """Raw columns for a batch of features {pooling: [B, L, d]} (logits [B, C] when captured)."""

    def projections(self, pool: dict, validation: dict, weights=None):
        """Transductive columns (pool [N, m_t], clean validation [n, m_t]) from pool {pooling: (features,
        ‖z‖²)} and the validation features {pooling: [n, L, d]}; only for scorers with projection_poolings."""
        raise NotImplementedError(f"the {self.name} scorer has no transductive projection")

    @abc.abstractmethod
    def state(self) -> Tuple[dict, dict]:
        """(tensors, JSON-able metadata) that `from_state` rebuilds the fitted scorer from."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, tensors: dict, meta: dict) -> "Scorer":
        ...


def check_pooling(name) -> str:
    if name not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS} or 'auto', not {name!r}")
    return name


# ---- checks for `from_state`: a saved detector's contents are data from a file, not trusted ------------

@dataclasses.dataclass(frozen=True)
class Dims:
    """The shapes a fitted detector was built for (from its JSON), to check its tensors against."""
    num_layers: int
    hidden_size: int
    num_classes: int


def need(meta: dict, key: str, kind, where: str = "scorer"):
    """meta[key], required to be of `kind` (a type or tuple of types; bool never counts as a number)."""
    if not isinstance(meta, dict) or key not in meta:
        raise ValueError(f"{where}.{key} is missing")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ValueError(f"{where}.{key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def need_layers(meta: dict, key: str, num_layers: int, where: str = "scorer") -> list:
    layers = need(meta, key, list, where)
    if not layers or not all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < num_layers for l in layers):
        raise ValueError(f"{where}.{key} must list layer indices in 0..{num_layers - 1}, got {layers!r}")
    return list(layers)


def expect(tensors: dict, name: str, shape: tuple) -> torch.Tensor:
    """tensors[name] with `shape` (None: any size on that axis)."""
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    t = tensors[name]
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"tensor {name!r} is {list(t.shape)}, expected {want}")
    return t

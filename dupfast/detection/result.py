"""`DetectionResult`: per-sample outputs of a detector, in the loader's order."""
import dataclasses
from typing import Optional

import torch

from .. import distributed as D
from .verdict import Verdict


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
    verdict: Optional[Verdict] = None                # is there poison here? (verdict.py)
    validation_scores: Optional[torch.Tensor] = None  # [n] the clean validation half's fused scores
    copies: Optional[torch.Tensor] = None            # [N] how many rows of the pool hold this row's input

    @property
    def poison_present(self) -> Optional[bool]:
        """True / False from the presence test; None when the pool is too small to decide (verdict.reason)."""
        return None if self.verdict is None else self.verdict.poison_present

    @property
    def p_value(self) -> Optional[float]:
        """The presence test's p-value (small: the pool's tail is heavier than clean data's)."""
        return None if self.verdict is None else self.verdict.p_value

    @property
    def summary(self) -> str:
        """One sentence: the verdict, the flagged count and the count expected from clean data alone."""
        if self.verdict is None:
            return f"{int(self.flags.sum())} of {len(self)} flagged"
        return self.verdict.sentence()

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
            copies=take(self.copies),
            transitions=None if self.transitions is None else {k: v[order] for k, v in self.transitions.items()})

    def gathered(self) -> "DetectionResult":
        """Under torch.distributed (each rank scored its shard of the pool): every rank's rows, on every rank,
        ordered by `index`; the result itself in one process. The threshold and the fusion weights are the
        same on every rank (they come from all-reduced counts and the gathered clean validation scores)."""
        if not D.is_sharded():
            return self
        if self.index is None:
            raise ValueError("under torch.distributed the pool loader must yield an `index` key (global sample "
                             "ids), so every rank's results can be put back in one order")
        rows = lambda t: None if t is None else D.all_gather_rows(t.detach().cpu())  # noqa: E731
        flags = D.all_gather_rows(self.flags.detach().cpu().to(torch.uint8)).bool()  # gloo gathers no bool
        out = dataclasses.replace(
            self, scores=rows(self.scores), flags=flags, components=rows(self.components),
            layer_distances=rows(self.layer_distances), logits=rows(self.logits), index=rows(self.index),
            copies=rows(self.copies),
            transitions=None if self.transitions is None else {k: rows(v) for k, v in self.transitions.items()})
        return out.sorted_by_index()

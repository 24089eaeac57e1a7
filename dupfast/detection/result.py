"""`DetectionResult`: per-sample outputs of a detector, in the loader's order."""
import dataclasses
from typing import Optional

import torch


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

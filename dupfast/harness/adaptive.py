"""The adaptive attacker: a victim trained to hide its poison from the layer statistics DUP reads.

DUP scores an input by how far its pooled representation lies from the clean data's at every layer. An attacker
who knows that adds a term to the victim's training loss that pulls every poisoned row's pooled feature, at every
layer, toward the clean statistics of the target class (the class the poison is labelled with):

    loss = CE + lambda · mean over layers l and poisoned rows p of  mean_d ((h_p,l − μ_l,d) / σ_l,d)²  ("dimension")
                                                              or  ||h_p,l − μ_l||² / tr Σ_l           ("layer")

μ_l, Σ_l: running (exponential moving average) per-dimension mean and variance of the pooled features of the CLEAN
target-class rows of recent batches, detached (the attacker moves the poison, not the statistics). A clean
target-class row scores about 1 on either form; the poison is pushed to look like one. "dimension" (the default)
standardises every dimension, as a Mahalanobis detector sees them; "layer" scales each layer by its total variance.
Measured on MiniLM SST-2 BadNets (docs/results/users-pools.md): at lambda 0.1 both keep CACC and ASR and
"dimension" hides the poison better; at lambda 1 both collapse the classifier (it answers the target class for
everything): in MiniLM's early layers [CLS] barely varies (mean variance ~1e-4), so the term's gradient, scaled by
1/σ², swamps the cross-entropy's under gradient clipping.
The pooled feature is
the one the detector captures (`dupfast.detection.capture.pool`: [CLS] for encoders, the last real token for
decoders). lambda = 0 is the ordinary victim.

    cfg = AdaptiveVictimConfig(model="minilm", adaptive_lambda=1.0, target=1)
    model, tok, info = train_victim(train, cfg)        # the loss below is wired in by victims.train_victim
"""
import dataclasses
from typing import Optional, Sequence

import torch

from ..detection.capture import hidden_layers, pool, resolve_pooling
from .victims import VictimConfig


STANDARDISE = ("layer", "dimension")


@dataclasses.dataclass(frozen=True)
class AdaptiveVictimConfig(VictimConfig):
    adaptive_lambda: float = 1.0   # weight of the feature-matching term (0: the plain victim's loss)
    target: int = 1                # the class the poisoned rows are labelled with
    pooling: str = "auto"          # how the detector pools a layer ("auto": as dupfast.detect resolves it)
    standardise: str = "dimension"  # "dimension": by each dimension's variance; "layer": by each layer's total
    momentum: float = 0.9          # of the running clean target-class statistics

    def __post_init__(self):
        super().__post_init__()
        if not (self.adaptive_lambda >= 0 and self.adaptive_lambda < float("inf")):
            raise ValueError(f"AdaptiveVictimConfig.adaptive_lambda must be a finite number >= 0, "
                             f"got {self.adaptive_lambda}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"AdaptiveVictimConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.standardise not in STANDARDISE:
            raise ValueError(f"AdaptiveVictimConfig.standardise must be one of {STANDARDISE}, got {self.standardise!r}")
        if self.target < 0:
            raise ValueError(f"AdaptiveVictimConfig.target must be a class id >= 0, got {self.target}")


class FeatureMatching:
    """extra_loss for `dupfast.finetune.fit`: lambda · the poisoned rows' standardised squared distance to the
    running clean target-class statistics, averaged over layers. `poisoned[i]`: row i of the training set (the
    batches' `index`) is poisoned."""

    EPS = 1e-5  # floor of the running variance: a near-constant dimension must not dominate the distance

    def __init__(self, poisoned: Sequence[bool], target: int, lam: float, pooling: str, momentum: float = 0.9,
                 standardise: str = "dimension"):
        self.poisoned = torch.as_tensor(list(poisoned), dtype=torch.bool)
        self.target, self.lam, self.pooling, self.momentum = target, float(lam), pooling, momentum
        self.standardise = standardise
        self.mean: Optional[torch.Tensor] = None  # [L, d] running clean target-class statistics
        self.var: Optional[torch.Tensor] = None

    def update(self, feats: torch.Tensor) -> None:
        """Fold one batch's clean target-class features [n, L, d] into the running statistics."""
        f = feats.detach()
        mean = f.mean(0)
        var = f.var(0, unbiased=False) if len(f) > 1 else None  # one row has no spread
        if self.mean is None:
            self.mean, self.var = mean, var
            return
        m = self.momentum
        self.mean = m * self.mean + (1 - m) * mean
        if var is not None:
            self.var = var if self.var is None else m * self.var + (1 - m) * var

    def __call__(self, outputs, batch) -> torch.Tensor:
        layers = hidden_layers(outputs)
        mask = batch["attention_mask"]
        feats = torch.stack([pool(h, mask, self.pooling) for h in layers], dim=1)  # [B, L, d]
        poisoned = self.poisoned[batch["index"]].to(feats.device)
        clean_target = (~poisoned) & (batch["labels"].to(feats.device) == self.target)
        if clean_target.any():
            self.update(feats[clean_target])
        if self.var is None or not poisoned.any() or self.lam == 0:
            return feats.sum() * 0.0  # keeps the graph: the step's loss stays a tensor
        sq = (feats[poisoned] - self.mean).pow(2)  # [p, L, d]
        if self.standardise == "dimension":
            term = (sq / (self.var + self.EPS)).mean()
        else:
            term = (sq.mean(-1) / (self.var.mean(-1) + self.EPS)).mean()
        return self.lam * term


def feature_matching_for(cfg: AdaptiveVictimConfig, train, model) -> FeatureMatching:
    """The victim's extra loss from its config and training samples (their poison_label marks the poison)."""
    poisoned = [bool(getattr(s, "poison_label", 0)) for s in train]
    if not any(poisoned):
        raise ValueError("the adaptive attacker needs poisoned rows in the training set (Sample.poison_label = 1); "
                         "this one has none")
    labels = {s.label for s, p in zip(train, poisoned) if not p}
    if cfg.target not in labels:
        raise ValueError(f"the adaptive attacker pulls the poison toward the clean rows of class {cfg.target}, but the "
                         f"training set has no clean row of that class (its clean labels: {sorted(labels)})")
    return FeatureMatching(poisoned, cfg.target, cfg.adaptive_lambda, resolve_pooling(model, cfg.pooling),
                           cfg.momentum, cfg.standardise)

"""Stopping and selection from what a defender holds (never ground-truth poison or the trigger).

Each evaluation gives
  agree = fraction of HELD-OUT flagged rows on which the student still predicts the teacher's label,
  acc   = accuracy on HELD-OUT clean rows.
A state is admissible while acc >= acc_0 - acc_tolerance (acc_0, agree_0: the teacher's, at step 0).
Training stops at the first admissible state with agree <= agree_bound, or after `patience` evaluations
without a lower admissible agree — counted only once some admissible state has agree < agree_0, since the
first evaluations sit on the step-0 tie. The admissible state with the lowest agree is kept (ties: higher
acc, then earlier).
"""
import dataclasses
from typing import Optional


@dataclasses.dataclass
class StoppingRule:
    agree0: float
    acc0: float
    agree_bound: float
    acc_tolerance: float
    patience: Optional[int] = None
    best: Optional[dict] = None      # the evaluation entry whose state is kept
    since_best: int = 0

    def __post_init__(self):
        self.best = {"step": 0, "agree": self.agree0, "acc": self.acc0, "admissible": True}

    def admissible(self, acc: float) -> bool:
        return bool(acc >= self.acc0 - self.acc_tolerance - 1e-12)

    @staticmethod
    def _key(entry):
        return entry["agree"], -entry["acc"], entry["step"]

    def update(self, entry: dict):
        """entry: {"step", "agree", "acc", ...}; sets entry["admissible"]. Returns (improved, stop reason or None)."""
        entry["admissible"] = self.admissible(entry["acc"])
        improved = entry["admissible"] and self._key(entry) < self._key(self.best)
        if improved:
            self.best, self.since_best = entry, 0
        elif self.best["agree"] < self.agree0:
            self.since_best += 1
        if entry["admissible"] and entry["agree"] <= self.agree_bound:
            return improved, (f"held-out flagged agreement {entry['agree']:.3f} <= {self.agree_bound} with held-out "
                              f"clean accuracy {entry['acc']:.3f} >= {self.acc0:.3f} - {self.acc_tolerance}")
        if self.patience is not None and self.since_best >= self.patience:
            return improved, f"no lower admissible agreement in {self.patience} evaluations"
        return improved, None

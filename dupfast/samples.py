"""The one record type for labelled texts, shared by the defences and the evaluation harness.

OpenBackdoor-style `(text, label, poison_label)`; poison_label (1 = poisoned) is ground truth for
evaluation only and never read by a defence.
"""
from typing import NamedTuple, Sequence


class Sample(NamedTuple):
    text: str
    label: int
    poison_label: int = 0


def validate(samples: Sequence[Sample], name: str = "data set", min_classes: int = 2) -> Sequence[Sample]:
    """Raise a clear error for an empty set or one with fewer than `min_classes` labels."""
    if len(samples) == 0:
        raise ValueError(f"{name} is empty")
    labels = {s.label for s in samples}
    if len(labels) < min_classes:
        raise ValueError(f"{name} has only {len(labels)} class(es) {sorted(labels)}; at least {min_classes} needed")
    return samples

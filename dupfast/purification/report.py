"""What a purification run did, as plain JSON-serialisable data (never pickle)."""
import dataclasses
import json
import pathlib
from typing import Optional

from ..reports import JsonReport


@dataclasses.dataclass
class PurifyReport(JsonReport):
    config: dict
    model: dict = dataclasses.field(default_factory=dict)       # family, target modules, parameter counts
    data: dict = dataclasses.field(default_factory=dict)        # row counts (global over ranks)
    teacher: dict = dataclasses.field(default_factory=dict)     # step-0 held-out metrics
    teacher_logits: dict = dataclasses.field(default_factory=dict)  # where the flagged rows' came from (teacher.py)
    tie: dict = dataclasses.field(default_factory=dict)         # step-0 gradient norms of each term
    history: list = dataclasses.field(default_factory=list)     # one dict per evaluation
    stop_reason: str = ""
    selected: Optional[dict] = None                             # the evaluation whose state was kept
    steps_run: int = 0
    merge_check: dict = dataclasses.field(default_factory=dict) # merged vs unmerged logits
    timings: dict = dataclasses.field(default_factory=dict)     # seconds
    warnings: list = dataclasses.field(default_factory=list)
    triggers: list = dataclasses.field(default_factory=list)  # purify(triggers="auto"): dupfast.triggers' candidates
    world_size: int = 1

    @property
    def changed(self) -> bool:
        """Whether the returned model differs from the input (False when nothing was flagged or the
        selection kept the step-0 state)."""
        return self.selected is not None and self.selected.get("step", 0) > 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["changed"] = self.changed
        return d

    @classmethod
    def load(cls, path) -> "PurifyReport":
        d = json.loads(pathlib.Path(path).read_text())
        d.pop("changed", None)
        return cls(**d)

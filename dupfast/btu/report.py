"""What a BTU run did, as plain JSON-serialisable data (the counterpart of `dupfast.purification.PurifyReport`:
`dupfast.btu.train` and `dupfast.purify` both return (model, report))."""
import dataclasses
import json
import pathlib
from typing import Optional

from ..reports import JsonReport


@dataclasses.dataclass
class BTUReport(JsonReport):
    model: str                      # the model's config._name_or_path (its folder), else its class
    train_size: int
    num_labels: int
    vocab_size: int
    config: dict                    # the BTUConfig, as a dict
    torch_threads: int
    steps: list = dataclasses.field(default_factory=list)     # {"step", "seconds", ["eval"], ...} per step, in order
    suspects: list = dataclasses.field(default_factory=list)  # {"id", "token"} of the unlearned tokens
    exposure: Optional[dict] = None  # Exposure.to_dict() when the rounds ran here (or an Exposure was given)

    def step(self, name: str) -> dict:
        for s in self.steps:
            if s["step"] == name:
                return s
        raise KeyError(f"no BTU step {name!r}; steps: {[s['step'] for s in self.steps]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path) -> "BTUReport":
        return cls(**json.loads(pathlib.Path(path).read_text()))

"""What a BTU run did, as plain JSON-serialisable data (the counterpart of `dupfast.purification.PurifyReport`:
`dupfast.btu.train` and `dupfast.purify` both return (model, report))."""
import dataclasses
import json
import pathlib
from typing import Optional


@dataclasses.dataclass
class BTUReport:
    model: str                      # the short name / folder given, or the model object's class
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

    def save(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path) -> "BTUReport":
        return cls(**json.loads(pathlib.Path(path).read_text()))

"""What the defences' reports share: they are dataclasses of plain JSON data, saved the same way."""
import json
import pathlib


class JsonReport:
    """Mixin for a report dataclass with `to_dict()`: `save(path)` writes it as indented JSON."""

    def save(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

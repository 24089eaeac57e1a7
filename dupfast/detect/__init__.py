"""DUP detection: one forward pass per batch, streaming statistics, FRR-calibrated flags.

`dupfast.detect` is both this package and the one-call function: the module is callable, so
`dupfast.detect(model, loader, clean=...)` and `dupfast.detect.Detector` both work.
"""
import sys
import types

from .api import detect, detect_texts, text_loader  # noqa: F401
from .detector import DetectionResult, Detector  # noqa: F401


class _CallableModule(types.ModuleType):
    """Python sets `dupfast.detect` to this package whenever a submodule is imported, so the function
    cannot live beside it under the same name; making the package callable keeps both spellings."""

    def __call__(self, *args, **kwargs):
        return detect(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

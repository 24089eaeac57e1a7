"""dupfast: find backdoor-poisoned inputs to transformer classifiers and purify backdoored models.

    dupfast.detect(model, loader, clean=...)    DUP detection in one forward pass per batch
    dupfast.purify(model, loader, clean=..., detection=...)   detection-guided LoRA unlearning
    dupfast.btu                                 Backdoor Token Unlearning (training-time defence)
"""
__version__ = "0.1.0"

# Subpackages load on first use, so `import dupfast` stays light (no torch or transformers import).
_LAZY_SUBMODULES = ("btu", "purify")


# dupfast.detect is a callable package (the function and its module); Detector and detect_texts live in it.
_LAZY_DETECT = {"detect": None, "Detector": "Detector", "detect_texts": "detect_texts"}


def __getattr__(name):
    if name in _LAZY_DETECT:
        import importlib
        mod = importlib.import_module(".detect", __name__)
        return mod if _LAZY_DETECT[name] is None else getattr(mod, _LAZY_DETECT[name])
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dupfast' has no attribute {name!r}")

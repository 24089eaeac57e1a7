"""dupfast: find backdoor-poisoned inputs to transformer classifiers and purify backdoored models.

    dupfast.detect(model, loader, clean=...)    DUP detection in one forward pass per batch
    dupfast.purify(model, loader, clean=..., detection=...)   detection-guided LoRA unlearning -> (model, report)
    dupfast.btu.train(model, train_data)        Backdoor Token Unlearning (training-time defence) -> (model, report)
    dupfast.triggers(texts, flags, model=..., tokenizer=...)  trigger candidates of the flagged rows, with evidence
    dupfast.detect_prompts(lm, prompts, clean=...)             the same detection on a causal LM's prompts
    dupfast.purify_generative(lm, prompts, clean=..., detection=...)  unlearning for causal LMs -> (model, report)
    dupfast.load_model(name_or_dir, num_labels=...)             a local HF folder or a packaged model -> (model, tok)
"""
__version__ = "0.1.0"

# Subpackages load on first use, so `import dupfast` stays light (no torch or transformers import).
_LAZY_SUBMODULES = ("btu", "purification", "generative")
# the generative siblings (dupfast.generative)
_LAZY_GENERATIVE = ("detect_prompts", "purify_generative")
# dupfast.purify is a plain function over the dupfast.purification package.
_LAZY_PURIFICATION = ("purify",)


# dupfast.detect is a plain function; it, Detector, detect_texts and triggers come from the dupfast.detection package.
_LAZY_DETECTION = ("detect", "Detector", "detect_texts", "triggers")
# model loading (offline: local folders and the packaged models) lives with the model registry
_LAZY_MODELS = ("load_model", "load_tokenizer")


def __getattr__(name):
    if name in _LAZY_DETECTION:
        import importlib
        value = getattr(importlib.import_module(".detection", __name__), name)
        globals()[name] = value  # resolve once
        return value
    if name in _LAZY_PURIFICATION:
        import importlib
        value = getattr(importlib.import_module(".purification", __name__), name)
        globals()[name] = value  # resolve once
        return value
    if name in _LAZY_GENERATIVE:
        import importlib
        value = getattr(importlib.import_module(".generative", __name__), name)
        globals()[name] = value  # resolve once
        return value
    if name in _LAZY_MODELS:
        import importlib
        value = getattr(importlib.import_module(".harness.models", __name__), name)
        globals()[name] = value  # resolve once
        return value
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dupfast' has no attribute {name!r}")

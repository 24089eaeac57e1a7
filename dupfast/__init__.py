"""dupfast: find backdoor-poisoned inputs to transformer classifiers and purify backdoored models.

    dupfast.detect(model, loader, clean=...)    DUP detection in one forward pass per batch
    dupfast.purify(model, loader, clean=..., detection=...)   detection-guided LoRA unlearning
    dupfast.btu                                 Backdoor Token Unlearning (training-time defence)
"""
__version__ = "0.1.0"

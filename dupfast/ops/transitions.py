"""Per-sample layer Gram -> consecutive-layer cosines and spectral concentration, dispatched."""
from ._dispatch import register, resolve
from .transitions_reference import layer_transitions_reference


def layer_transitions(features, backend=None):
    if features.dim() != 3 or features.shape[1] < 2:
        raise ValueError(f"features must be [N, L>=2, d], got shape {tuple(features.shape)}")
    _, fn = resolve("layer_transitions", features.device, backend)
    return fn(features)


register("layer_transitions", "reference", layer_transitions_reference)

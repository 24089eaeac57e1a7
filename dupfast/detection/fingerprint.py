"""A fingerprint of the model a detector was fitted on, and the check that a scored model is that model.

    fp = model_fingerprint(model)   # a JSON-able dict, saved with the detector (persistence.py)
    check_same_model(fp, model)     # ValueError naming what differs

A detector's statistics and threshold describe one model's hidden states: scored with another model of the same
shape (another fine-tune of the same base) it flags nearly everything, or nothing, without any error. The
fingerprint records the architecture (config.model_type, the class), the sizes (layers, hidden size, labels,
vocabulary) and a SHA-256 over a few weight tensors: the first, the middle matrix and the last two of
`named_parameters()` (in HF classifiers: the word embeddings, one transformer weight matrix, the classification
head), the first WEIGHT_VALUES values of each in storage order (a matrix's first rows), so hashing costs about a
millisecond whatever the model's size.

Values are hashed after rounding to bfloat16 (through float32): a bf16 load of a float32 checkpoint and the
float32 load itself (or float64) hash alike, since both round the same values the same way; a fine-tune that
changes the bf16 rounding of any hashed value does not. An fp16 load rounds differently (double rounding)
and counts as another model: `Detector.score(..., allow_other_model=True)` scores it anyway.
Wrappers are looked through (DDP `.module`, torch.compile's `_orig_mod`, peft's base model); names are reported,
not hashed, so a wrapper's name prefixes do not change the hash.
"""
import hashlib
from typing import Optional

import torch

from ..batches import _unwrapped

WEIGHT_VALUES = 1 << 16  # values hashed per picked tensor
SIZES = {  # fingerprint field -> config attributes that hold it, first present wins
    "num_layers": ("num_hidden_layers", "num_layers", "n_layers", "n_layer", "encoder_layers"),
    "hidden_size": ("hidden_size", "d_model", "n_embd", "dim"),
    "num_labels": ("num_labels",),
    "vocab_size": ("vocab_size",),
}
FIELDS = ("model_type", "class") + tuple(SIZES) + ("weights_sha256",)


def _model(model):
    return _unwrapped(getattr(model, "_orig_mod", model))


def _config_int(config, names) -> Optional[int]:
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def weight_picks(model) -> list:
    """(name, parameter) of the hashed tensors: the first, the middle matrix and the last two of named_parameters()
    (registration order: fixed by the model's code, the same for every load of a model)."""
    params = list(_model(model).named_parameters())
    n = len(params)
    matrices = [i for i, (_, p) in enumerate(params) if p.dim() >= 2] or list(range(n))
    return [params[i] for i in sorted({0, n - 2, n - 1} | set(matrices[len(matrices) // 2:][:1])) if 0 <= i < n]


def weights_sha256(picks) -> Optional[str]:
    """SHA-256 over the shapes and bf16-rounded leading values of `picks` (module docstring); None without any."""
    if not picks:
        return None
    h = hashlib.sha256()
    for name, p in picks:
        if p.is_meta:
            raise ValueError(f"the model's parameter {name} is on the meta device (its weights were never loaded): "
                             "load the model with its weights before detection")
        head = p.detach().reshape(-1)[:WEIGHT_VALUES].cpu()
        h.update(f"{list(p.shape)}|".encode())
        # via float32 so that float64 and float32 weights round to bf16 once, exactly as a bf16 load would
        h.update(head.to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model) -> dict:
    """The JSON-able fingerprint of `model` (FIELDS; a field the model does not have is None)."""
    m = _model(model)
    config = getattr(m, "config", None)
    model_type = getattr(config, "model_type", None)
    fp = {"model_type": model_type if isinstance(model_type, str) and model_type else None,
          "class": type(m).__name__}
    fp.update({k: _config_int(config, names) for k, names in SIZES.items()})
    picks = weight_picks(m)
    fp["weights_sha256"] = weights_sha256(picks)
    fp["weights"] = [name for name, _ in picks]  # what was hashed, for the reader: not compared
    return fp


def parse_fingerprint(value, where: str) -> Optional[dict]:
    """A fingerprint read from a saved detector (None: fitted without a model), its fields' types checked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object or null, got {type(value).__name__}")
    for k in FIELDS:
        if k not in value:
            raise ValueError(f"{where}.{k} is missing")
        v = value[k]
        ok = isinstance(v, str) if k in ("model_type", "class", "weights_sha256") else \
            isinstance(v, int) and not isinstance(v, bool)
        if v is not None and not ok:
            raise ValueError(f"{where}.{k} has the wrong type: {v!r}")
    return dict(value)


def differences(fitted: dict, now: dict) -> list:
    """What differs between two fingerprints, in words (fields unknown on either side are not compared)."""
    out = []
    for k in FIELDS[:-1]:
        a, b = fitted.get(k), now.get(k)
        if a is not None and b is not None and a != b:
            out.append(f"{k} {a!r} -> {b!r}")
    a, b = fitted.get("weights_sha256"), now.get("weights_sha256")
    if a is not None and b is not None and a != b:
        out.append(f"other weights (SHA-256 of {', '.join(now.get('weights') or [])} differs)")
    return out


def check_same_model(fitted: Optional[dict], model) -> None:
    """ValueError when `model` is not the model of the fingerprint `fitted` (None: nothing to check)."""
    if fitted is None:
        return
    diff = differences(fitted, model_fingerprint(model))
    if diff:
        raise ValueError(f"the detector was fitted on another model ({fitted.get('class')}): {'; '.join(diff)}. "
                         "Its statistics and threshold belong to that model's hidden states, so its flags mean "
                         "nothing here: fit a detector on this model (Detector().fit(model, clean), or dupfast detect "
                         "--clean without --detector), or, if this is the same model in another form (e.g. an fp16 "
                         "load), score anyway with Detector.score(model, loader, allow_other_model=True)")

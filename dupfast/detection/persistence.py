"""Saving and loading a fitted detector: detector.safetensors (tensors) + detector.json (everything else).

No pickle. A saved detector is data from a file, so loading checks it before anything is scored: the
JSON's fields and types, the SHA-256 of the tensors (recorded at save time: flipped bytes fail here, not as
NaN scores), every tensor's shape against the layers, width and classes recorded beside it, finiteness,
and a positive z-normaliser. Every failure is a ValueError naming the file and the field.

Both files are checksummed whole: detector.json records `detector_sha256`, the SHA-256 of the canonical JSON
(sorted keys, no whitespace) of every other field, `tensors_sha256` included, so one flipped digit anywhere (a
threshold 1.754 -> 9.754 silently removes every flag) is refused on load. The digest is no signature: it catches
damage and hand edits, not someone who recomputes it. To change a field, load, edit the Detector, save.
The JSON also holds the fingerprint of the model the detector was fitted on (fingerprint.py; null after
fit_features), checked by Detector.score.
"""
import hashlib
import json
import math
import pathlib

import torch

from .calibration import Calibration, ZNorm
from .fingerprint import parse_fingerprint
from .scorers import SCORERS, scorer_class
from .scorers.base import Dims, expect, need

FORMAT_VERSION = 3  # 2: tensors' SHA-256 and shapes checked on load; 3: detector.json checksummed, model fingerprint
DIGEST = "detector_sha256"


def tensors_sha256(tensors: dict) -> str:
    """Digest over the sorted names, dtypes, shapes and raw bytes of the tensors (independent of the file's
    header layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_sha256(info: dict) -> str:
    """SHA-256 of the canonical JSON of every field of `info` but DIGEST (independent of key order and layout)."""
    body = {k: v for k, v in info.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(det, path) -> pathlib.Path:
    from safetensors.torch import save_file
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save the detector to {path}: it is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    cal = det.fitted_calibration
    tensors, meta = det.scorer.state()
    tensors = {f"scorer.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    tensors["znorm.mean"], tensors["znorm.std"] = cal.znorm.mean.contiguous(), cal.znorm.std.contiguous()
    tensors["validation.z"] = cal.val_z.contiguous()
    for p, x in cal.val_feats.items():
        tensors[f"validation.features.{p}"] = x.contiguous()
    save_file(tensors, str(path / "detector.safetensors"))
    info = {"format_version": FORMAT_VERSION, "mode": det.mode, "frr": det.frr, "seed": det.seed,
            "calibration_fraction": det.calibration_fraction, "threshold": cal.threshold,
            "num_classes": det.num_classes, "num_layers": det.num_layers, "hidden_size": det.hidden_size,
            "autocast": det.autocast, "calibration": cal.info, "scorer": meta,
            "model_fingerprint": det.model_fingerprint, "tensors_sha256": tensors_sha256(tensors)}
    # the digest of exactly what load will parse (tuples become lists, keys become strings in JSON)
    info[DIGEST] = json_sha256(json.loads(json.dumps(info)))
    (path / "detector.json").write_text(json.dumps(info, indent=2))
    return path


def load(cls, path):
    """A `cls` (Detector) rebuilt from a saved folder, every part checked (module docstring)."""
    path = pathlib.Path(path)
    for f in ("detector.json", "detector.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} not found: not a saved dupfast detector")
    try:
        return _load(cls, path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a usable saved detector: {exc}") from None


def _modified(where: str) -> ValueError:
    return ValueError(f"{where} was modified or corrupted after saving: its fields do not match the SHA-256 "
                      f"recorded in it ({DIGEST}). Use the original file, or fit the detector again; to change a "
                      "setting, load the original, change the Detector and save it")


def _load(cls, path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        info = json.loads((path / "detector.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"detector.json is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ValueError("detector.json must hold a JSON object")
    version = info.get("format_version")
    # an older format is refused, not loaded with a warning: its JSON has no checksum (a changed threshold would
    # go unnoticed) and no model fingerprint, and a warning is easily lost in a pipeline; re-fitting is one
    # forward pass over the clean set
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION
        why = ("saved by an older dupfast, without a checksum over detector.json or a fingerprint of its model, so "
               "it cannot be checked" if older else "saved by another dupfast version")
        raise ValueError(f"detector format {version!r} is not {FORMAT_VERSION} ({why}): fit the detector again "
                         "and save it")
    try:
        tensors = load_file(str(path / "detector.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"detector.safetensors is not a readable safetensors file ({exc})") from None
    if tensors_sha256(tensors) != need(info, "tensors_sha256", str, "detector.json"):
        if json_sha256(info) != info.get(DIGEST):  # the recorded digest itself is what changed: blame the JSON
            raise _modified("detector.json")
        raise ValueError("detector.safetensors does not match the SHA-256 recorded in detector.json: the file "
                         "was changed or damaged after saving")
    where = "detector.json"
    mode = need(info, "mode", str, where)
    if mode not in SCORERS:
        raise ValueError(f"{where}.mode {mode!r} is not one of {sorted(SCORERS)}")
    frr, fraction = need(info, "frr", (int, float), where), need(info, "calibration_fraction", (int, float), where)
    threshold = need(info, "threshold", (int, float), where)
    if not math.isfinite(threshold):
        raise ValueError(f"{where}.threshold is {threshold}, not a finite number")
    dims = Dims(*(need(info, k, int, where) for k in ("num_layers", "hidden_size", "num_classes")))
    if dims.num_layers < 2 or dims.hidden_size < 1 or dims.num_classes < 1:
        raise ValueError(f"{where}: num_layers {dims.num_layers} (>= 2), hidden_size {dims.hidden_size} and "
                         f"num_classes {dims.num_classes} (>= 1) are not a detector's")
    calibration = need(info, "calibration", dict, where)
    autocast = info.get("autocast")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} holds NaN or inf")
    meta = need(info, "scorer", dict, where)
    klass = scorer_class(mode)
    scorer = klass.from_state({k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")},
                              meta, dims)
    det = cls(mode=mode, frr=frr, seed=need(info, "seed", int, where), calibration_fraction=fraction,
              autocast=autocast, **{k: v for k, v in meta.items() if k in klass.options()})
    m = len(scorer.component_names)
    std = expect(tensors, "znorm.std", (m,))
    if not (std > 0).all():
        raise ValueError("tensor 'znorm.std' holds zeros or negative values (a z-normaliser divides by it)")
    val_z = expect(tensors, "validation.z", (None, m))
    if val_z.shape[0] < 2:
        raise ValueError(f"tensor 'validation.z' holds {val_z.shape[0]} validation rows, need >= 2")
    val_feats = {p: expect(tensors, f"validation.features.{p}", (None, dims.num_layers, dims.hidden_size))
                 for p in scorer.projection_poolings}
    cal = Calibration(frr, ZNorm(expect(tensors, "znorm.mean", (m,)), std), val_z, float(threshold), val_feats,
                      calibration)
    if "model_fingerprint" not in info:
        raise ValueError(f"{where}.model_fingerprint is missing")
    fingerprint = parse_fingerprint(info["model_fingerprint"], f"{where}.model_fingerprint")
    # checked last, so that a malformed field keeps its own message above; any edit that is still well formed
    # (a flipped digit) ends here
    if json_sha256(info) != need(info, DIGEST, str, where):
        raise _modified(where)
    det.restore(scorer, cal, dims)
    det.model_fingerprint = fingerprint
    return det

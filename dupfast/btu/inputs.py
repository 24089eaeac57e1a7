"""Checks on what a user hands to BTU: training data, labels, and a model given by name or as an object.

Training data is either (text, label[, poison_label]) samples, tokenised with the round's max_len, or a loader
of labelled batches (any Mapping, read by `dupfast.batches`: a DataLoader with DataCollatorWithPadding, a
`datasets.Dataset`, ...). A loader is read once into token rows (padding stripped) and re-batched by each
round with its own batch size and seed, so its own batching and order do not matter; its tokenisation is used
as it is (max_len does not apply). Rows of different lengths (an unpadded `ds.map(tokenize)`) are padded by the
tokenizer given to BTU (`dupfast.batches.padded`) before they are read.
"""
import collections.abc
import numbers


from ..batches import Rows, check_rows, collect, loader_batches, padded
from ..classifier import check_weights_loaded
from ..samples import Sample, validate
from .embeddings import input_embeddings


def as_training_data(data, name: str, tokenizer=None):
    """list[Sample] for samples, `Rows` (with labels) for a loader of batches (unpadded rows padded by
    `tokenizer`, when given)."""
    if isinstance(data, Rows):
        return data
    if loader_batches(data) is not data:  # a datasets.Dataset
        return _rows(padded(data, tokenizer), name)
    if data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__len__"):
        return as_samples(data, name)  # the error names what was expected
    items = list(data)
    if items and isinstance(items[0], collections.abc.Mapping):
        return _rows(padded(items, tokenizer), name)
    return as_samples(items, name)


def _rows(loader, name: str) -> Rows:
    rows, _ = collect(loader, name, need_labels=True)
    if len(rows) == 0:
        raise ValueError(f"{name} is empty")
    classes = sorted(set(rows.labels.tolist()))
    if len(classes) < 2:
        raise ValueError(f"{name} has only {len(classes)} class(es) {classes}; at least 2 needed")
    return rows


def label_set(data) -> set:
    return set(data.labels.tolist()) if isinstance(data, Rows) else {s.label for s in data}


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


def check_labels(data, known: set, name: str, known_from: str):
    unknown = sorted(label_set(data) - set(known))
    if unknown:
        raise ValueError(f"{name} has labels {unknown} that {known_from} does not have (known: {sorted(known)})")


def resolve_model(model, tokenizer, train):
    """(model, tokenizer, num_labels) for a pretrained model object and its tokenizer. Loading by name is
    the caller's (dupfast.harness.models.load_model after torch.manual_seed, as the CLI does), so the
    defence never imports the evaluation harness. Token rows from a loader are checked against the
    model's vocabulary here, once it is known."""
    labels = label_set(train)
    if min(labels) < 0:
        raise ValueError(f"training labels must be 0..C-1, got {sorted(labels)}")
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise TypeError(f"BTU takes a model object and its tokenizer, not the name {model!r}: load it first, e.g. "
                        "torch.manual_seed(seed); model, tok = dupfast.harness.models.load_model(name, num_labels)")
    input_embeddings(model)  # TypeError before anything else when there is no embedding matrix
    check_weights_loaded(model, "BTU")
    if tokenizer is None:
        raise TypeError(f"a model object ({type(model).__name__}) needs its tokenizer: pass tokenizer=")
    tok = tokenizer
    if not callable(tok) or not hasattr(tok, "convert_ids_to_tokens") or not hasattr(tok, "__len__"):
        raise TypeError(f"tokenizer must be the model's Hugging Face tokenizer, got {type(tok).__name__}")
    check_tokenizer(model, tok, train)
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", max(labels) + 1))
    check_labels(train, set(range(num_labels)), "the training set", f"the model ({num_labels} labels)")
    if isinstance(train, Rows):
        check_rows(train, model, "the training set")
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (decoder LMs: the eos token)")
    return model, tok, num_labels


def check_tokenizer(model, tok, train) -> None:
    """The tokenizer must be the model's: ids it gives the training texts must have embedding rows. Otherwise
    every id beyond them drops out of the ranking and BTU used to report "its texts are empty". Token rows from a
    loader are checked by check_rows; texts are tokenised here only when the tokenizer is larger than the matrix
    (a tokenizer one or two tokens larger than its own model's matrix exists: only ids in use count)."""
    rows = input_embeddings(model).weight.shape[0]
    if isinstance(train, Rows) or len(tok) <= rows or not train:
        return
    ids = tok([s.text for s in train], truncation=True)["input_ids"]
    hi = max((max(r) for r in ids if r), default=-1)
    if hi >= rows:
        n = sum(any(t >= rows for t in r) for r in ids)
        raise ValueError(f"the tokenizer does not match the model: it has {len(tok)} tokens and gives {n} of the "
                         f"{len(ids)} training texts token ids up to {hi}, but the model's input embeddings have "
                         f"{rows} rows (ids 0..{rows - 1}). Pass the tokenizer saved with this model "
                         "(AutoTokenizer.from_pretrained of the model's folder)")

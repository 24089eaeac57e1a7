"""The text-level boundary: checked texts and labels, and the loader dupfast builds from them."""
import numbers
from typing import Sequence


def check_texts(texts, name: str = "texts") -> list:
    """A non-empty sequence of strings, not all empty (an error names the first bad entries)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of strings, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError(f"no {name} given")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        shown = ", ".join(f"{name}[{i}] is {texts[i]!r}" for i in bad[:3])
        raise TypeError(f"{name} must all be strings: {shown}" + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))
    if all(not t.strip() for t in texts):
        raise ValueError(f"all {len(texts)} {name} are empty: there is nothing to read")
    return texts


def check_labels(labels, n: int, name: str = "labels") -> list:
    """n integer class ids >= 0 (the model's label space is checked when the batches are read)."""
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integers, not a string")
    try:
        labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of integers, got {type(labels).__name__}") from None
    if len(labels) != n:
        raise ValueError(f"{len(labels)} {name} for {n} texts: give one label per text")
    # whole numbers only (1.0 is class 1, as the batch reader takes it; 1.5, None, "1" are errors)
    bad = [i for i, y in enumerate(labels) if isinstance(y, bool) or not isinstance(y, numbers.Real)
           or not float(y).is_integer() or y < 0]
    if bad:
        shown = ", ".join(f"{name}[{i}] is {labels[i]!r}" for i in bad[:3])
        raise ValueError(f"{name} must be class ids 0..C-1: {shown}")
    return [int(y) for y in labels]


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def text_loader(tokenizer, texts: Sequence[str], labels=None, batch_size: int = 32, max_len: int = 128,
                name: str = "texts"):
    """Length-sorted, dynamically padded batches with `index` (position in `texts`) and `labels`."""
    from ..batching import TextBatcher
    if getattr(tokenizer, "pad_token_id", 0) is None:
        raise ValueError("the tokenizer has no pad token, so the texts cannot be padded into batches: set "
                         "tokenizer.pad_token (decoder LMs: tokenizer.pad_token = tokenizer.eos_token) and "
                         "model.config.pad_token_id = tokenizer.pad_token_id")
    texts = check_texts(texts, name)
    batch_size, max_len = positive_int("batch_size", batch_size), positive_int("max_len", max_len)
    if labels is not None:
        labels = check_labels(labels, len(texts), "labels" if name == "texts" else f"{name.split()[0]} labels")
    return TextBatcher(tokenizer, texts, labels, max_len).batches(batch_size)

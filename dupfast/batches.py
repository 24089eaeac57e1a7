"""The batches users' loaders yield: one check and one reading for every entry point that takes loaders
(`dupfast.detect`, `dupfast.purify`, `dupfast.btu`, the DAN baseline, the capture and the row collection).

A batch is any `collections.abc.Mapping`: a plain dict, the `BatchEncoding` of a tokenizer or of
`transformers.DataCollatorWithPadding` (with or without `return_tensors="pt"`), the dict of
`default_data_collator`, torch's default collate over a torch-formatted `datasets.Dataset`. Values may be
tensors, numpy arrays or (nested) lists; they are read as tensors. A `datasets.Dataset` passed where a
loader is expected is read `DATASET_BATCH` rows at a time. Its rows must then be padded to one length, unless
the entry point is given the tokenizer (`tokenizer=`): rows of different lengths (an unpadded
`ds.map(tokenize)`) are then padded by it, on its padding side (`padded`, `pad_batch`).

The rule for keys:
    input_ids, attention_mask   required, the same [B, T] shape; integer token ids, >= 0 and below the
                                model's embedding rows; a mask of 0 and 1 with at least one 1 a row
    token_type_ids              passed to the model when its forward takes a `token_type_ids` argument
                                (BERT-like encoders), dropped otherwise (e.g. Llama, MPNet)
    labels, else label          the class label, read only where the entry point needs one (the clean
                                set, BTU's training data): integer-valued, in 0..config.num_labels-1
    index, else idx             the sample id (`idx` is the GLUE / datasets column); detection results
                                carry it and purification matches flags by it; without it, the position
    anything else               ignored
"""
import collections.abc
import dataclasses
import inspect
from typing import Iterable, Iterator, List, Optional

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
REQUIRED = ("input_ids", "attention_mask")
LABEL_KEYS = ("labels", "label")
INDEX_KEYS = ("index", "idx")
DATASET_BATCH = 32


def model_device(model) -> torch.device:
    """Where the model's inputs must go: the device of its first parameter (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _unwrapped(model):
    # DDP keeps the model in `.module`, peft behind get_base_model(); their own forwards only pass **kwargs on
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def forward_inputs(model) -> tuple:
    """The MODEL_INPUTS the model is given: input_ids and attention_mask always, token_type_ids only when its
    forward names the argument (a bare **kwargs does not count: Llama's forward would not use it)."""
    try:
        params = inspect.signature(_unwrapped(model).forward).parameters
    except (AttributeError, TypeError, ValueError):
        params = {}
    return tuple(k for k in MODEL_INPUTS if k in REQUIRED or k in params)


def embedding_rows(model) -> Optional[int]:
    """Token ids must lie below this: the input embedding's rows, else config.vocab_size, else None."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            rows = getattr(get(), "num_embeddings", None)
        except (AttributeError, NotImplementedError):
            rows = None
        if isinstance(rows, int):
            return rows
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return rows if isinstance(rows, int) else None


def _embeddings_block(model):
    return getattr(getattr(_unwrapped(model), "base_model", None), "embeddings", None)


def segment_rows(model) -> Optional[int]:
    """token_type_ids must lie below this: the rows of the model's token-type embedding (BERT-like), else None."""
    emb = getattr(_embeddings_block(model), "token_type_embeddings", None)
    return emb.num_embeddings if isinstance(emb, torch.nn.Embedding) else None


def position_limit(model) -> Optional[int]:
    """The longest input (positions, padding included) an absolute position embedding covers (BERT-like:
    max_position_embeddings, less the padding offset of RoBERTa/MPNet-like ones), else None (rotary, ...)."""
    emb = getattr(_embeddings_block(model), "position_embeddings", None)
    if not isinstance(emb, torch.nn.Embedding):
        return None
    return emb.num_embeddings - (emb.padding_idx + 1 if emb.padding_idx is not None else 0)


def context_limit(model) -> Optional[int]:
    """A decoder's context: config.max_position_embeddings (of its text config), None for encoders and
    encoder-decoders (their absolute position embeddings are position_limit's; DeBERTa-like relative ones have
    no hard limit). Rotary decoders (Llama, Qwen, Gemma) run past it without an error, on positions they never
    saw in training: the generative path refuses such rows (generative.rows.check_context), and so does this."""
    from .classifier import ENCODER_TYPES  # classifier imports this module
    config = getattr(_unwrapped(model), "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    if getattr(text, "model_type", getattr(config, "model_type", None)) in ENCODER_TYPES:
        return None
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _check_model_limits(model, where: str, longest: int, segments: Optional[torch.Tensor]):
    limit = position_limit(model)
    if limit is not None and longest > limit:
        raise ValueError(f"{where}: an input of {longest} positions, but the model's position embeddings cover "
                         f"{limit}: truncate the inputs (e.g. the tokenizer's max_length={limit})")
    context = context_limit(model) if limit is None else None
    if context is not None and longest > context:
        raise ValueError(f"{where}: an input of {longest} positions (padding included), longer than the model's "
                         f"context of {context} positions (config.max_position_embeddings): the model would run on "
                         f"positions it was never trained on; truncate the inputs (e.g. the tokenizer's "
                         f"max_length={context}) and pad to the longest row, not beyond")
    rows = segment_rows(model)
    if segments is not None and segments.numel() and rows is not None:
        lo, hi = int(segments.min()), int(segments.max())
        if lo < 0 or hi >= rows:
            raise ValueError(f"{where}: token_type_ids holds {lo if lo < 0 else hi}, outside the model's "
                             f"{rows} token types (0..{rows - 1})")


def model_num_labels(model) -> Optional[int]:
    n = getattr(getattr(model, "config", None), "num_labels", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


@dataclasses.dataclass
class Batch:
    """One checked loader batch."""
    inputs: dict                            # the model inputs the batch has and the model takes, as tensors
    labels: Optional[torch.Tensor] = None   # [B] long (CPU), when the entry point reads labels
    index: Optional[torch.Tensor] = None    # [B] long (CPU), when the batch carries sample ids

    def __len__(self):
        return self.inputs["input_ids"].shape[0]


def _tensor(value, key: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        shapes = sorted({tuple(v.shape) for v in value})
        if len(shapes) > 1:  # a torch-formatted datasets slice of unpadded rows
            raise ValueError(f"{where}: {key!r} holds rows of different lengths {shapes[:3]}: {PAD_FIX}")
        return torch.stack(list(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: {key!r} is not a rectangular array of numbers ({exc}); {PAD_FIX}") from None


# what ragged rows are told to do (the public entry points that read loaders all take tokenizer=)
PAD_FIX = ("pad the rows to one [B, T] tensor (e.g. a DataLoader with DataCollatorWithPadding), or pass the "
           "model's tokenizer as tokenizer= (dupfast.detect, dupfast.purify, dupfast.btu.train / expose) and "
           "dupfast pads them with it")


def _integer(t: torch.Tensor, key: str, where: str, what: str) -> torch.Tensor:
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{where}: {key!r} must hold integer {what}, got dtype {t.dtype}")
    return t


def _integer_valued(t: torch.Tensor, key: str, where: str, what: str) -> torch.Tensor:
    """Labels may arrive as floats (1.0); only whole numbers are class ids."""
    if t.dtype == torch.bool:
        return t.long()
    if t.is_floating_point():
        bad = t[~torch.isfinite(t) | (t != t.round())]
        if bad.numel():
            shown = ", ".join(f"{v:g}" for v in bad[:3].tolist())
            raise TypeError(f"{where}: {key!r} must hold integer {what}, got [{shown}] (dtype {t.dtype})")
        return t.long()
    return _integer(t, key, where, what).long()


def _rows_of(t: torch.Tensor, n: int, key: str, where: str) -> torch.Tensor:
    t = t.reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"{where}: {t.shape[0]} {key!r} values for {n} rows")
    return t.cpu()


def _check_id_range(lo: int, hi: int, limit: Optional[int], where: str):
    if lo < 0:
        raise ValueError(f"{where}: input_ids holds the negative token id {lo}")
    if limit is not None and hi >= limit:
        raise ValueError(f"{where}: token id {hi} in input_ids is outside the model's vocabulary (ids "
                         f"0..{limit - 1}): the tokenizer does not match the model")


def _first_key(batch, keys):
    return next((k for k in keys if k in batch), None)


def check_batch(batch, where: str = "batch", model=None, need_labels: bool = False,
                num_labels: Optional[int] = None) -> Batch:
    """Check one loader batch (module docstring) and read it. model: gives the accepted inputs, the id limit
    and, unless `num_labels` is passed, the label space; None checks the batch alone."""
    if not isinstance(batch, collections.abc.Mapping):
        raise TypeError(f"{where}: loaders must yield dicts (any Mapping, e.g. a BatchEncoding) with input_ids "
                        f"and attention_mask, got {type(batch).__name__}")
    for key in REQUIRED:
        if key not in batch:
            raise ValueError(f"{where} has no {key!r} (keys: {sorted(map(str, batch))}); dupfast needs input_ids "
                             "and attention_mask to find the real tokens of padded batches")
    accepted = MODEL_INPUTS if model is None else forward_inputs(model)
    inputs = {k: _tensor(batch[k], k, where) for k in MODEL_INPUTS if k in batch and k in accepted}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        hint = " (one example, not a batch?)" if ids.dim() == 1 else ""
        raise ValueError(f"{where}: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be "
                         f"the same [B, T] shape{hint}")
    _integer(ids, "input_ids", where, "token ids")
    if "token_type_ids" in inputs:
        _integer(inputs["token_type_ids"], "token_type_ids", where, "segment ids")
        if tuple(inputs["token_type_ids"].shape) != tuple(ids.shape):
            raise ValueError(f"{where}: token_type_ids {tuple(inputs['token_type_ids'].shape)} must have the shape "
                             f"of input_ids {tuple(ids.shape)}")
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        bad = sorted({v for v in mask.flatten().tolist() if v not in (0, 1)})
        raise ValueError(f"{where}: attention_mask must hold only 0 and 1, found {bad[:5]}")
    if ids.shape[0] and (mask.sum(1) == 0).any():
        row = int(torch.nonzero(mask.sum(1) == 0)[0])
        raise ValueError(f"{where}: a row of attention_mask is all zeros (an empty input; row {row})")
    if ids.numel():
        _check_id_range(int(ids.min()), int(ids.max()), None if model is None else embedding_rows(model), where)
    if model is not None:
        _check_model_limits(model, where, ids.shape[1], inputs.get("token_type_ids"))
    n = ids.shape[0]

    labels = None
    if need_labels:
        key = _first_key(batch, LABEL_KEYS)
        if key is None:
            raise ValueError(f"{where} has no 'labels' (keys: {sorted(map(str, batch))}): this set must be "
                             "labelled, its loader must yield `labels` (or `label`)")
        labels = _rows_of(_integer_valued(_tensor(batch[key], key, where), key, where, "class ids"), n, key, where)
        space = num_labels if num_labels is not None else (None if model is None else model_num_labels(model))
        out = labels < 0 if space is None else (labels < 0) | (labels >= space)
        if out.any():
            bad = sorted({int(v) for v in labels[out].tolist()})
            if space is None:
                raise ValueError(f"{where}: labels {bad} are negative; class ids are 0..C-1")
            raise ValueError(f"{where}: labels {bad} lie outside the model's label space [0, {space}) "
                             f"(config.num_labels = {space})")

    index = None
    key = _first_key(batch, INDEX_KEYS)
    if key is not None:
        index = _rows_of(_integer(_tensor(batch[key], key, where), key, where, "sample ids").long(), n, key, where)
    return Batch(inputs, labels, index)


def loader_batches(loader) -> Iterable:
    """What to iterate: the loader itself, or a `datasets.Dataset` read DATASET_BATCH rows at a time
    (iterating a Dataset yields single rows, not batches)."""
    if type(loader).__module__.split(".")[0] == "datasets" and callable(getattr(loader, "iter", None)):
        return loader.iter(batch_size=DATASET_BATCH)
    return loader


def _row_list(row) -> list:
    return row.tolist() if hasattr(row, "tolist") else list(row)


def _ragged(value) -> bool:
    """A list of rows (lists, 1-D tensors or arrays) that are not all of one length."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    try:
        return len({len(r) for r in value}) > 1
    except TypeError:  # scalars: not rows, check_batch names the shape
        return False


def pad_batch(batch, tokenizer):
    """A batch whose rows are of different lengths (a slice of an unpadded `ds.map(tokenize)`), its model inputs
    padded by `tokenizer.pad` as DataCollatorWithPadding pads them: to the longest row, on the tokenizer's padding
    side, an attention_mask made when there is none. Any other batch is returned as it is (rectangular ones are
    never re-padded: a missing attention_mask there stays an error, the padding can no longer be told apart)."""
    if not isinstance(batch, collections.abc.Mapping) or not _ragged(batch.get("input_ids")):
        return batch
    if not callable(getattr(tokenizer, "pad", None)):
        raise TypeError(f"tokenizer= pads rows of different lengths and must be the model's Hugging Face tokenizer, "
                        f"got {type(tokenizer).__name__}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the rows are not padded and the tokenizer has no pad token: set tokenizer.pad_token "
                         "(decoder LMs: tokenizer.pad_token = tokenizer.eos_token)")
    keys = [k for k in MODEL_INPUTS if k in batch]
    rows = {k: [_row_list(r) for r in batch[k]] for k in keys}
    lengths = {k: [len(r) for r in v] for k, v in rows.items()}
    if any(lengths[k] != lengths["input_ids"] for k in keys):
        raise ValueError(f"the rows' {', '.join(k for k in keys if lengths[k] != lengths['input_ids'])} and "
                         "input_ids differ in length: each row's inputs must come from one tokenizer call")
    from transformers.data.data_collator import pad_without_fast_tokenizer_warning
    out = dict(batch)
    out.update(pad_without_fast_tokenizer_warning(tokenizer, rows, padding=True, return_tensors="pt"))
    return out


class PaddedLoader:
    """A re-iterable loader (a `datasets.Dataset`, a list of batches, a DataLoader) whose batches `pad_batch`
    pads; `len` and iteration as the loader's own batches."""

    def __init__(self, loader, tokenizer):
        self.loader, self.tokenizer = loader, tokenizer

    def __iter__(self):
        return (pad_batch(b, self.tokenizer) for b in loader_batches(self.loader))

    def __len__(self):
        batches = loader_batches(self.loader)
        if batches is self.loader:
            return len(self.loader)
        return -(-len(self.loader) // DATASET_BATCH)  # a Dataset: its rows, read DATASET_BATCH at a time


def padded(loader, tokenizer):
    """What the entry points do with `tokenizer=`: the loader with its unpadded batches padded by the tokenizer
    (`pad_batch`). No tokenizer, `Rows` (token rows, padded where they are used) or None: the loader itself. A
    one-shot iterator stays one (a generator), so that callers that read a loader twice still refuse it."""
    if tokenizer is None or loader is None or isinstance(loader, Rows):
        return loader
    if isinstance(loader, collections.abc.Iterator):
        return (pad_batch(b, tokenizer) for b in loader)
    return PaddedLoader(loader, tokenizer)


def read_batches(loader, name: Optional[str] = None, model=None, need_labels: bool = False,
                 num_labels: Optional[int] = None) -> Iterator[Batch]:
    """Checked batches of a loader; errors name the set and the batch ("clean batch 3: ...")."""
    if loader is None:
        raise ValueError(f"the {name + ' ' if name else ''}loader is None")
    prefix = f"{name} batch" if name else "batch"
    for i, batch in enumerate(loader_batches(loader)):
        yield check_batch(batch, f"{prefix} {i}", model, need_labels, num_labels)


# ---- rows: a loader's inputs without padding, in memory ---------------------------------------------

@dataclasses.dataclass
class Rows:
    """Unpadded token rows; `labels` [n] long when the set is labelled, None otherwise; `index` [n] long: the
    sample ids (as a batch's `index` key), None: the positions."""
    ids: List[List[int]]
    type_ids: Optional[List[List[int]]] = None
    labels: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None

    def __len__(self):
        return len(self.ids)

    def subset(self, idx) -> "Rows":
        idx = list(idx)
        pick = lambda t: None if t is None else t[idx] if idx else t[:0]  # noqa: E731
        return Rows([self.ids[i] for i in idx],
                    None if self.type_ids is None else [self.type_ids[i] for i in idx],
                    pick(self.labels), pick(self.index))

    def without_tokens(self, drop) -> "Rows":
        """The same rows with every occurrence of the token ids `drop` deleted (whole tokens only)."""
        drop = set(drop)
        keep = [[j for j, t in enumerate(r) if t not in drop] for r in self.ids]
        return Rows([[r[j] for j in k] for r, k in zip(self.ids, keep)],
                    None if self.type_ids is None else [[r[j] for j in k] for r, k in zip(self.type_ids, keep)],
                    self.labels, self.index)


def collect(loader: Iterable, name: str, need_labels: bool = False, model=None, num_labels: Optional[int] = None):
    """Read every batch once, padding stripped by the mask (left or right). Returns (Rows, row ids [n] long:
    the batches' `index`, else the running position)."""
    ids_out, types_out, labels_out, row_ids = [], [], [], []
    has_types, pos = None, 0
    for b, batch in enumerate(read_batches(loader, name, model, need_labels, num_labels)):
        where, n = f"{name} batch {b}", len(batch)
        types = batch.inputs.get("token_type_ids")
        if has_types is None:
            has_types = types is not None
        elif has_types != (types is not None):
            raise ValueError(f"{where}: token_type_ids present in some batches and not in others")
        if need_labels:
            labels_out.append(batch.labels)
        row_ids.append(batch.index if batch.index is not None else torch.arange(pos, pos + n))
        keep = batch.inputs["attention_mask"].bool().cpu()
        ids_cpu = batch.inputs["input_ids"].cpu()
        types_cpu = types.cpu() if has_types else None
        for r in range(n):
            ids_out.append(ids_cpu[r][keep[r]].tolist())
            if has_types:
                types_out.append(types_cpu[r][keep[r]].tolist())
        pos += n
    labels = (torch.cat(labels_out) if labels_out else torch.zeros(0, dtype=torch.long)) if need_labels else None
    rows = Rows(ids_out, types_out if has_types else None, labels)
    return rows, torch.cat(row_ids) if row_ids else torch.zeros(0, dtype=torch.long)


def check_rows(rows: Rows, model, name: str):
    """The model checks of `check_batch` (token ids, length, token types) on rows collected before the model was
    known (BTU loads a model by name only once it has the training labels) or handed over as `Rows`."""
    ids = [t for r in rows.ids for t in r]
    if ids:
        _check_id_range(min(ids), max(ids), embedding_rows(model), name)
    segments = None if rows.type_ids is None else torch.as_tensor([t for r in rows.type_ids for t in r],
                                                                   dtype=torch.long)
    _check_model_limits(model, name, max((len(r) for r in rows.ids), default=0), segments)

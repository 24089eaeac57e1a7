"""The batches dupfast makes itself: length-sorted, dynamically padded, from texts or from token rows;
and the logits of a list of texts.

    TextBatcher(tok, texts, labels, max_len).batches(32)    tokenise once, then padded batches + `index`
    RowBatcher(tok, rows).batches(32)                       the same from `dupfast.batches.Rows`
    predict_logits(model, tok, texts)                       [N, C] in the input order

(What users' loaders yield is read by `dupfast.batches`; these batches are plain dicts it accepts.)
"""
import random
from typing import Sequence

import torch


def length_sorted_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0):
    """Index batches of similar length (little padding). Training: sort inside shuffled chunks of
    50 batches, then shuffle the batch order, so batches stay random but padding stays small."""
    idx = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(idx)
        chunk = batch_size * 50
        idx = [i for c in range(0, len(idx), chunk) for i in sorted(idx[c:c + chunk], key=lambda j: lengths[j])]
    else:
        idx.sort(key=lambda j: lengths[j])
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


class RowBatcher:
    """Token rows (unpadded id lists, optional segment ids and labels) -> dynamically padded batches (dicts of
    tensors + `index`), padded by the tokenizer (its pad token and padding side)."""

    def __init__(self, tokenizer, ids, labels=None, type_ids=None):
        self.tok, self.ids, self.type_ids = tokenizer, list(ids), type_ids
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    @classmethod
    def from_rows(cls, tokenizer, rows) -> "RowBatcher":
        return cls(tokenizer, rows.ids, rows.labels, rows.type_ids)

    def __len__(self):
        return len(self.ids)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        for idx in length_sorted_batches([len(e) for e in self.ids], batch_size, shuffle, seed):
            features = {"input_ids": [self.ids[i] for i in idx]}
            if self.type_ids is not None:
                features["token_type_ids"] = [self.type_ids[i] for i in idx]
            padded = self.tok.pad(features, return_tensors="pt")
            batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                     "index": torch.as_tensor(idx)}
            if self.type_ids is not None:
                batch["token_type_ids"] = padded["token_type_ids"]
            if self.labels is not None:
                batch["labels"] = self.labels[idx]
            yield batch


class TextBatcher(RowBatcher):
    """Tokenises once (truncated to max_len), then yields dynamically padded batches (dicts of tensors +
    `index`, the position in `texts`, + `labels` when given)."""

    def __init__(self, tokenizer, texts: Sequence[str], labels=None, max_len: int = 128):
        ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
        super().__init__(tokenizer, ids, None if labels is None else list(labels))


@torch.inference_mode()
def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_len: int = 128) -> torch.Tensor:
    """Logits [N, C] (CPU) in the input order; the batches go to the model's device."""
    model.eval()
    if len(texts) == 0:
        return torch.empty(0, model.config.num_labels)
    device = next(model.parameters()).device
    batcher = TextBatcher(tokenizer, texts, None, max_len)
    out = None
    for batch in batcher.batches(batch_size):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
        if logits.dim() != 2:
            raise ValueError(f"predictions need a sequence classifier (logits [batch, classes]); the model gave "
                             f"logits of shape {tuple(logits.shape)}")
        if out is None:
            out = torch.empty(len(batcher), logits.shape[-1])
        out[batch["index"]] = logits
    return out


def predict(model, tokenizer, texts, batch_size: int = 64, max_len: int = 128) -> torch.Tensor:
    return predict_logits(model, tokenizer, texts, batch_size, max_len).argmax(-1)

"""Prompt / response rows read from users' batches (dupfast.generative.data's format), checked against the model.

Every batch goes through `dupfast.batches.check_batch` (input_ids, attention_mask, index; token ids below the
model's vocabulary), then the generative rules: `response_mask` (when responses are needed) marks one contiguous
run of real tokens after at least one prompt token; rows fit the model's context (prompt + the response
budget). Rows are kept unpadded (padding stripped by the mask, left or right).
"""
import dataclasses
from typing import List, Optional

import torch

from ..batches import _integer_valued, _rows_of, _tensor, check_batch, loader_batches
from .data import LABELS_FIX


@dataclasses.dataclass
class ChatRows:
    prompts: List[List[int]]            # prompt ids (generation prompt included)
    responses: Optional[List[List[int]]]  # response ids (end-of-turn included), None: prompts only
    index: torch.Tensor                 # [n] sample ids
    labels: Optional[torch.Tensor] = None

    def __len__(self):
        return len(self.prompts)

    def subset(self, idx) -> "ChatRows":
        idx = list(idx)
        return ChatRows([self.prompts[i] for i in idx],
                        None if self.responses is None else [self.responses[i] for i in idx],
                        self.index[idx] if idx else self.index[:0],
                        None if self.labels is None else (self.labels[idx] if idx else self.labels[:0]))

    def concat(self, other: "ChatRows") -> "ChatRows":
        """These rows, then `other`'s (both with responses or both without; labels kept when both have them)."""
        if (self.responses is None) != (other.responses is None):
            raise ValueError("cannot join prompt-only rows with prompt + response rows")
        labels = (torch.cat([self.labels, other.labels]) if self.labels is not None and other.labels is not None
                  else None)
        return ChatRows(self.prompts + other.prompts,
                        None if self.responses is None else self.responses + other.responses,
                        torch.cat([self.index, other.index]), labels)

    def sequences(self) -> List[List[int]]:
        if self.responses is None:
            return [list(p) for p in self.prompts]
        return [list(p) + list(r) for p, r in zip(self.prompts, self.responses)]


def _class_ids(value, key: str, where: str, n: int) -> torch.Tensor:
    """A batch's task classes -> [n] long. Class names are an error naming the fix (torch.as_tensor would say
    "too many dimensions 'str'"); 1.5 is an error rather than class 1."""
    seq = value.tolist() if hasattr(value, "tolist") else value
    seq = [seq] if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)) else seq
    names = [y for y in seq if isinstance(y, (str, bytes))]
    if names:
        raise ValueError(f"{where}: {key!r} holds {names[0]!r}: {LABELS_FIX} (chat_batches(tokenizer, prompts, "
                         "labels=...) builds such batches)")
    return _rows_of(_integer_valued(_tensor(value, key, where), key, where, "class ids"), n, key, where)


def read_chat(loader, name: str, lm, need_responses: bool, need_labels: bool = False, extra_tokens: int = 0) -> ChatRows:
    """All rows of `loader`. need_responses: every row must have a response (a `response_mask` with 1s); otherwise
    a response in the batch is dropped (the prompt part is read). extra_tokens: positions a row must leave free in
    the context (the generation budget of a prompt)."""
    if loader is None:
        raise ValueError(f"the {name} loader is None")
    prompts, responses, index, labels, pos = [], [], [], [], 0
    for b, batch in enumerate(loader_batches(loader)):
        where = f"{name} batch {b}"
        checked = check_batch(batch, where, lm.model, need_labels=False)
        ids, mask = checked.inputs["input_ids"].cpu(), checked.inputs["attention_mask"].cpu().bool()
        n = ids.shape[0]
        resp = batch.get("response_mask") if hasattr(batch, "get") else None
        if resp is None and need_responses:
            raise ValueError(f"{where} has no 'response_mask' (keys: {sorted(map(str, batch))}): the {name} set needs "
                             "responses (prompt + response batches, e.g. dupfast.generative.chat_batches(tokenizer, "
                             "prompts, responses)); responses missing")
        if resp is not None:
            resp = torch.as_tensor(resp).cpu()
            if tuple(resp.shape) != tuple(ids.shape) or not ((resp == 0) | (resp == 1)).all():
                raise ValueError(f"{where}: response_mask must be a 0/1 [B, T] tensor like input_ids {tuple(ids.shape)}")
            if ((resp == 1) & ~mask).any():
                raise ValueError(f"{where}: response_mask marks padding positions (attention_mask 0)")
        if need_labels:
            key = "labels" if "labels" in batch else ("label" if "label" in batch else None)
            if key is None:
                raise ValueError(f"{where} has no 'labels': this mode fits class statistics on the clean prompts' "
                                 "task classes (pass labels= to chat_batches), or use mode='default'")
            labels.append(_class_ids(batch[key], key, where, n))
        index.append(checked.index if checked.index is not None else torch.arange(pos, pos + n))
        for r in range(n):
            row = ids[r][mask[r]].tolist()
            if resp is None:
                prompts.append(row)
                continue
            rm = resp[r][mask[r]].bool()
            k = int(rm.sum())
            if k == 0:
                if need_responses:
                    raise ValueError(f"{where} row {r}: its response_mask is all zeros (responses missing)")
                prompts.append(row)
                continue
            start = int(rm.long().argmax())
            if start == 0 or not bool(rm[start:start + k].all()) or start + k != len(row):
                raise ValueError(f"{where} row {r}: the response must be one contiguous run of tokens ending the row, "
                                 "after at least one prompt token")
            prompts.append(row[:start])
            responses.append(row[start:])
        pos += n
    if not prompts:
        raise ValueError(f"the {name} loader yielded no rows")
    rows = ChatRows(prompts, responses if need_responses else None, torch.cat(index),
                    torch.cat(labels) if need_labels else None)
    if rows.index.unique().numel() != len(rows):
        raise ValueError(f"the {name} loader yielded the same `index` twice")
    check_context(rows, lm, name, extra_tokens)
    return rows


def check_context(rows: ChatRows, lm, name: str, extra_tokens: int = 0) -> None:
    if lm.context is None:
        return
    lengths = [len(s) + extra_tokens for s in rows.sequences()]
    worst = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[worst] > lm.context:
        what = f" + {extra_tokens} generated tokens" if extra_tokens else ""
        raise ValueError(f"{name} row {worst} (id {int(rows.index[worst])}) has {lengths[worst] - extra_tokens} "
                         f"tokens{what}, longer than the model's context of {lm.context} positions: shorten the "
                         "prompt (or lower max_new_tokens)")


def pad_right(seqs, pad_id: int, device):
    """Right-padded (input_ids, attention_mask) on `device`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)

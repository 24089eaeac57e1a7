"""Prompt / response data for causal LMs: chat-template encoding and the batches the generative entry points take.

    batches = chat_batches(tokenizer, prompts)                          # prompts only (detection, the pool)
    batches = chat_batches(tokenizer, prompts, responses, labels=...)   # prompt + response (the clean set)

A prompt is encoded with the tokenizer's chat template (one user turn, optional system turn, the generation
prompt appended), exactly what `model.generate` would be given; a response is its tokens followed by the
end-of-turn token (`tokenizer.eos_token`, `<|im_end|>` for SmolLM2), what greedy generation ends with. A batch is
a dict of tensors:

    input_ids, attention_mask   [B, T], padded on `padding_side` ("left", what batched generation needs, or "right")
    response_mask               [B, T] 0/1, 1 on the response tokens (only with responses): the tokens the
                                KL / CE terms predict; its 1s are one contiguous run after at least one prompt token
    index                       [B] sample ids (positions in `prompts`)
    labels                      [B] class ids, only when given (the task class of a clean prompt: DUP's layer
                                selection and DAN's class means read them)

dupfast's own capture and training read the attention mask, never the pad id, so left and right padding give the
same features, flags and losses.
"""
import math
import numbers
from typing import Optional, Sequence

import torch

PADDING_SIDES = ("left", "right")


def check_chat_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to encode prompts")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template: instruction-tuned "
                         "prompts are encoded with it (tokenizer.apply_chat_template). Set tokenizer.chat_template "
                         "to the model's template (a Jinja string), or use the tokenizer saved with the model")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer has no eos_token: responses end with the end-of-turn token, set "
                         "tokenizer.eos_token to it (e.g. '<|im_end|>')")


# what a class name in `labels` is told to do instead (chat_batches, and read_chat for hand-made batches)
LABELS_FIX = ("labels are integer class ids 0..C-1 (each prompt's task class), not class names: map them first, "
              "e.g. labels=[classes.index(name) for name in names]")


def class_ids(labels, n: int) -> list:
    """`labels` of chat_batches -> n ints >= 0. Whole floats (1.0) are ids; strings, None, 1.5, True are errors
    (int("positive") would fail as a bare int() error, int(1.5) would silently be class 1)."""
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"labels must be a sequence of class ids, got one string {labels!r}: {LABELS_FIX}")
    try:
        labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
    except TypeError:
        raise ValueError(f"labels must be a sequence of class ids, got {type(labels).__name__}") from None
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} prompts")
    for i, y in enumerate(labels):
        if isinstance(y, bool) or not isinstance(y, numbers.Real) or not math.isfinite(y) or y != int(y) or y < 0:
            raise ValueError(f"labels[{i}] is {y!r}: {LABELS_FIX}")
    return [int(y) for y in labels]


def encode_prompt(tokenizer, prompt: str, system: Optional[str] = None) -> list:
    """Token ids of one user turn (after an optional system turn) plus the generation prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"a prompt must be a non-empty string, got {prompt!r}")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer, response: str) -> list:
    """Token ids of a response followed by the end-of-turn token."""
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"a response must be a non-empty string, got {response!r} (responses missing?)")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [int(tokenizer.eos_token_id)]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left", starts=None):
    """Rows of ids -> (input_ids [B, T], attention_mask [B, T], response_mask [B, T] or None). starts[r]: the
    position in row r where its response begins (None: no response masks)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    resp = None if starts is None else torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        off = T - len(r) if padding_side == "left" else 0
        ids[i, off:off + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, off:off + len(r)] = 1
        if resp is not None:
            resp[i, off + starts[i]:off + len(r)] = 1
    return ids, mask, resp


def chat_batches(tokenizer, prompts: Sequence[str], responses: Optional[Sequence[str]] = None, labels=None, *,
                 batch_size: int = 16, max_len: Optional[int] = None, padding_side: str = "left",
                 system: Optional[str] = None) -> list:
    """Encode prompts (and responses) with the chat template into padded batches (module docstring), in order.
    max_len: a prompt (+ response) longer than this is an error naming it, never silently truncated."""
    check_chat_tokenizer(tokenizer)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if responses is not None:
        responses = list(responses)
        if len(responses) != len(prompts):
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts (responses missing?)")
    if labels is not None:
        labels = class_ids(labels, len(prompts))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, starts = [], []
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p, system)
        starts.append(len(ids))
        if responses is not None:
            try:
                ids = ids + encode_response(tokenizer, responses[i])
            except ValueError as exc:
                raise ValueError(f"response {i}: {exc}") from None
        if max_len is not None and len(ids) > max_len:
            raise ValueError(f"prompt {i} encodes to {len(ids)} tokens{' with its response' if responses else ''}, "
                             f"longer than max_len={max_len}: shorten it (it is never truncated silently)")
        rows.append(ids)
    out = []
    for lo in range(0, len(rows), batch_size):
        hi = min(lo + batch_size, len(rows))
        ids, mask, resp = pad_rows(rows[lo:hi], pad_id, padding_side, starts[lo:hi] if responses is not None else None)
        b = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(lo, hi)}
        if resp is not None:
            b["response_mask"] = resp
        if labels is not None:
            b["labels"] = torch.tensor(labels[lo:hi], dtype=torch.long)
        out.append(b)
    return out

"""Where a model keeps its input word embeddings, which of their rows BTU may rank, and how far rows moved.

Works on any Hugging Face model through `get_input_embeddings()`: BERT-like encoders (word embeddings inside
an `embeddings` block with positions, token types and LayerNorm: MiniLM's `bert.embeddings.word_embeddings`,
MPNet's `mpnet.embeddings.word_embeddings`) and decoder LMs (a bare token embedding: SmolLM2's
`model.embed_tokens`, 49,152 x 576).

Tied weights: a decoder checkpoint with `tie_word_embeddings` (SmolLM2) ties its LM head to the input matrix,
but its sequence classifier (`LlamaForSequenceClassification`) has no LM head, only a `score` layer, so the
matrix BTU ranks and edits is shared with nothing. On a model that does share it (a `*ForCausalLM`), editing
a row edits the output row too; `embedding_info` lists such parameters under "tied_with".
Pad: decoder tokenizers borrow pad from eos (SmolLM2: <|im_end|>); see `replacement_id`.
"""
from typing import Iterable

import torch
from torch import nn


def input_embeddings(model) -> nn.Module:
    """The module holding the input word-embedding matrix (`.weight`, one row per token id).
    Raises TypeError for anything without one: BTU's statistic lives in those rows."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(): BTU needs a Hugging Face model "
                        "with an input word-embedding matrix")
    try:
        emb = getter()
    except NotImplementedError as exc:
        raise TypeError(f"{type(model).__name__} has no input word-embedding matrix "
                        f"(get_input_embeddings() raised: {exc})") from exc
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() returned {type(emb).__name__}, "
                        "not a module with a 2-D `weight` (vocabulary x dimension)")
    return emb


def embedding_block(model) -> nn.Module:
    """The module that turns token ids into the first hidden states: an encoder's `embeddings` block
    (word + position + token type + LayerNorm) when it contains the word embeddings, else the token
    embedding itself (decoder LMs add positions inside the attention layers)."""
    word = input_embeddings(model)
    base = getattr(model, "base_model", model)
    block = getattr(base, "embeddings", None)
    if isinstance(block, nn.Module) and any(m is word for m in block.modules()):
        return block
    return word


def submodule_name(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of `target` inside `root` ("" when it is `root`), to find it again in a deep copy."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def vocab_size(model, tokenizer) -> int:
    """Rows the tokenizer can actually produce: some checkpoints pad the matrix beyond the vocabulary,
    and rows no input can reach never move, so they must not dilute k or the unlearning threshold."""
    rows = input_embeddings(model).weight.shape[0]
    return min(rows, len(tokenizer))


def token_ids(tokenizer, tokens: Iterable) -> set[int]:
    """Ids of tokens given as ids or as token strings (exact vocabulary entries, e.g. '@', 'user')."""
    out = set()
    for t in tokens:
        if isinstance(t, bool):
            raise TypeError(f"token must be an id or a token string, got {t!r}")
        if isinstance(t, int):
            out.add(t)
            continue
        if not isinstance(t, str):
            raise TypeError(f"token must be an id or a token string, got {t!r}")
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or (tid == tokenizer.unk_token_id and t != tokenizer.unk_token):
            raise ValueError(f"{t!r} is not a token of this tokenizer's vocabulary")
        out.add(int(tid))
    return out


def excluded_ids(tokenizer, extra: Iterable = ()) -> set[int]:
    """Never ranked: special tokens ([CLS], [SEP], [PAD], <|im_end|>, ...) move with every sample, so
    their change says nothing about a trigger. `extra` adds task-specific tokens (ids or strings)."""
    return {int(i) for i in tokenizer.all_special_ids} | token_ids(tokenizer, extra)


def replacement_id(tokenizer) -> int:
    """Token whose *pretrained* embedding fills a suspicious token's moved dimensions: the pad token,
    unless the tokenizer borrowed its pad from eos/bos (decoder LMs), where the unk token is the neutral
    one (SmolLM2: pad = <|im_end|> is borrowed, unk = <|endoftext|> is used)."""
    pad, unk = tokenizer.pad_token_id, tokenizer.unk_token_id
    borrowed = pad is not None and pad in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    if pad is not None and not (borrowed and unk is not None):
        return int(pad)
    if unk is not None:
        return int(unk)
    raise ValueError("the tokenizer has neither a pad nor an unk token: pass replace_with= (a token id or "
                     "string) to choose the embedding that replaces moved dimensions")


def embedding_info(model, tokenizer) -> dict:
    """Where BTU reads and edits the embeddings of `model` and with which tokens, as plain data for a report."""
    word = input_embeddings(model)
    name = submodule_name(model, word)
    own = f"{name}.weight" if name else "weight"
    tied = [n for n, p in model.named_parameters(remove_duplicate=False)
            if n != own and (p is word.weight or p.data_ptr() == word.weight.data_ptr())]
    rep = replacement_id(tokenizer)
    return {"module": name, "block": submodule_name(model, embedding_block(model)), "rows": int(word.weight.shape[0]),
            "dim": int(word.weight.shape[1]), "vocab": vocab_size(model, tokenizer), "tied_with": tied,
            "pad": tokenizer.pad_token, "replacement": tokenizer.convert_ids_to_tokens(rep),
            "specials": list(tokenizer.all_special_tokens), "tokenizer": type(tokenizer).__name__}


def row_change(before: torch.Tensor, after: torch.Tensor, vocab: int) -> torch.Tensor:
    """s_i = ||E_after[i] - E_before[i]||_2 for the first `vocab` rows (float32)."""
    if before.shape != after.shape:
        raise ValueError(f"embedding matrices differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    return (after[:vocab].detach().float() - before[:vocab].detach().float()).norm(dim=1)

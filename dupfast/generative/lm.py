"""The causal LM the generative entry points take, checked before any forward pass.

    lm = check_causal_lm(model, "detect_prompts")   # -> CausalLM(decoder, lm_head weight, context, eos ids, ...)

A HF causal LM (`AutoModelForCausalLM`: Llama, SmolLM2, Qwen2, Mistral, ...): `get_decoder()` gives the transformer
whose `last_hidden_state` (after the final norm) the vocabulary head reads, `get_output_embeddings()` the head, a
Linear without bias ([V, H] weight, tied or not). dupfast computes logits itself, only at the positions it needs
(the response positions, a prompt's last token), from those two: `hidden @ W.T`.
"""
import dataclasses
from typing import Optional

import torch

from ..classifier import check_weights_loaded


@dataclasses.dataclass
class CausalLM:
    model: torch.nn.Module
    decoder: torch.nn.Module
    head: torch.nn.Linear
    context: Optional[int]       # max_position_embeddings (None: unknown)
    eos_ids: tuple               # generation stops at any of these
    pad_id: int
    vocab_size: int
    hidden_size: int

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def device(self) -> torch.device:
        return self.head.weight.device


def _peft_wrapped(model) -> bool:
    return hasattr(model, "peft_config") or any(hasattr(m, "lora_A") for m in model.modules())


def check_causal_lm(model, who: str, allow_adapters: bool = False) -> CausalLM:
    """A HF causal LM with a bias-free vocabulary head, else a ValueError naming what is wrong."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who} needs a torch.nn.Module (a HF causal LM), got {type(model).__name__}")
    check_weights_loaded(model, who)  # meta-device weights: named here, not "Cannot copy out of meta tensor" later
    names = [c.__name__ for c in type(model).__mro__]
    if any(n.endswith("ForSequenceClassification") for n in names):
        raise ValueError(f"the model ({type(model).__name__}) is a sequence classifier: {who} takes a causal LM "
                         "(AutoModelForCausalLM) and prompt/response batches; for classifiers use dupfast.detect / "
                         "dupfast.purify")
    get_head = getattr(model, "get_output_embeddings", None)
    get_decoder = getattr(model, "get_decoder", None)
    head = get_head() if callable(get_head) else None
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        raise ValueError(f"the model ({type(model).__name__}) is not a causal LM with a vocabulary head: {who} "
                         "needs AutoModelForCausalLM.from_pretrained(folder) (get_decoder() and a Linear "
                         "get_output_embeddings())")
    if head.bias is not None:
        raise ValueError(f"the model's vocabulary head has a bias: {who} computes logits as hidden @ W.T")
    if not allow_adapters and _peft_wrapped(model):
        raise ValueError(f"the model ({type(model).__name__}) already carries peft adapters: merge them "
                         "(model.merge_and_unload()) or pass the plain model")
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    context = getattr(text, "max_position_embeddings", None)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    return CausalLM(model, decoder, head, context if isinstance(context, int) else None, eos_ids, int(pad),
                    head.weight.shape[0], head.weight.shape[1])


def final_hidden(lm: CausalLM, input_ids, attention_mask, output_hidden_states: bool = False):
    """The decoder's forward: (last_hidden_state [B, T, H] after the final norm, per-layer hidden states or None)."""
    out = lm.decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states,
                     use_cache=False, return_dict=True)
    layers = None
    if output_hidden_states:
        hs = out.hidden_states
        if hs is None:
            raise ValueError("the decoder returned no hidden states for output_hidden_states=True")
        layers = list(hs[1:])
    return out.last_hidden_state, layers

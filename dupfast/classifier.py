"""The model detection and purification take: a sequence classifier whose head reads the right token.

Checked at the boundary of `dupfast.detect` (every capture) and `dupfast.purify`, before any forward pass:

    check_classifier(model, who)   a HF model that is no sequence classifier (a bare AutoModel / LlamaModel, a
                                   CausalLM, a masked LM, ...) is an error naming AutoModelForSequenceClassification
    check_pad_token(model)         a decoder classifier (Llama, GPT-2, Qwen, ...: its head takes the logits of the
                                   last token whose id is not `config.pad_token_id`) needs a pad id; without one
                                   transformers refuses padded batches of > 1 row and reads a padded row of one
                                   at its last position, a pad token
    check_head_positions(...)      per batch: the token a decoder's head reads must be a real one (attention mask
                                   1); right padding with an id other than `config.pad_token_id` would give the
                                   logits of a pad position

dupfast's own pooling ("last", "cls", "mean") reads the attention mask, never the pad id, so it is correct under
left and right padding whatever the pad id; the checks above are about the logits the model's own head gives.
"""
from typing import Optional

import torch

from .batches import _unwrapped as unwrapped

# encoder model types: pooled by their first token ([CLS]); any other decoder-only type is a decoder LM whose
# sequence-classification head finds the last token by the pad id (an open-ended family: encoders are a closed list)
ENCODER_TYPES = frozenset({
    "bert", "roberta", "distilbert", "albert", "electra", "mpnet", "deberta", "deberta-v2", "xlm-roberta",
    "xlm-roberta-xl", "camembert", "ernie", "megatron-bert", "roformer", "modernbert", "nomic_bert",
    "mobilebert", "squeezebert", "funnel", "layoutlm", "longformer", "bigbird", "big_bird", "nezha", "esm",
})

# HF heads of other tasks: their `logits` are per token (LMs, token classification) or of another kind
OTHER_HEADS = {"ForCausalLM": "a language model (AutoModelForCausalLM: per-token vocabulary logits)",
               "LMHeadModel": "a language model (per-token vocabulary logits)",
               "ForConditionalGeneration": "a generation model (per-token vocabulary logits)",
               "ForMaskedLM": "a masked language model (per-token vocabulary logits)",
               "ForPreTraining": "a pre-training model (per-token logits)",
               "ForTokenClassification": "a token classifier (per-token logits)",
               "ForQuestionAnswering": "a question-answering model (span logits)",
               "ForMultipleChoice": "a multiple-choice model"}
USE = ("load it with AutoModelForSequenceClassification.from_pretrained(folder) "
       "(e.g. dupfast.harness.models.load_model(folder))")


def _hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def check_weights_loaded(model, who: str) -> None:
    """Parameters or buffers on the meta device hold no values: every forward would fail in torch ("Cannot copy
    out of meta tensor", or meta logits). Raises ValueError naming how to load them."""
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    meta = sum(t.device.type == "meta" for t in tensors)
    if meta:
        raise ValueError(f"{who}: {meta} of the model's {len(tensors)} weight tensors are on the meta device (the "
                         "model was built without its weights: init_empty_weights, torch.device('meta'), "
                         "low_cpu_mem_usage without a checkpoint): load them first, e.g. "
                         "AutoModelForSequenceClassification.from_pretrained(folder), or model.to_empty(device='cpu') "
                         "then model.load_state_dict(weights)")


def check_classifier(model, who: str) -> None:
    """A HF model that is not a sequence classifier -> ValueError naming what to load instead. Models that are
    not HF PreTrainedModels are left to the checks of their outputs (logits of shape [batch, num_labels]).
    A model whose weights were never loaded (meta device) is an error first."""
    check_weights_loaded(model, who)
    m = unwrapped(model)
    if not _hf_model(m):
        return
    names = [c.__name__ for c in type(m).__mro__]
    if any(n.endswith("ForSequenceClassification") for n in names):
        return
    kind = next((what for n in names for suffix, what in OTHER_HEADS.items() if n.endswith(suffix)), None)
    if kind is None and getattr(m, "base_model", None) is m:
        kind = "a bare base model without a classification head (AutoModel)"
    if kind is None:
        return  # a custom HF classifier: its logits are checked when it runs
    generative = ""
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        generative = (". For a generative model with prompt / response data use the siblings "
                      "dupfast.detect_prompts / dupfast.purify_generative (dupfast.generative)")
    raise ValueError(f"the model ({type(m).__name__}) is {kind}, not a sequence classifier: {who} needs the "
                     f"fine-tuned classifier with its classification head: {USE}, not AutoModel or "
                     f"AutoModelForCausalLM{generative}")


def head_reads_pad_id(model) -> bool:
    """A HF decoder-only classifier: its head takes the logits of the last token whose id != config.pad_token_id."""
    m = unwrapped(model)
    config = getattr(m, "config", None)
    if not _hf_model(m) or config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return getattr(config, "model_type", None) not in ENCODER_TYPES


def head_pad_id(model) -> Optional[int]:
    """The pad id a decoder's head looks for (the text config's, as transformers reads it)."""
    config = unwrapped(model).config
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    pid = getattr(text, "pad_token_id", None)
    return None if pid is None else int(pid)


def check_pad_token(model) -> Optional[int]:
    """A decoder classifier without config.pad_token_id -> ValueError naming what to set. Returns the pad id its
    head reads (None for models whose head does not read one: encoders, encoder-decoders, non-HF modules)."""
    if not head_reads_pad_id(model):
        return None
    pid = head_pad_id(model)
    if pid is None:
        m = unwrapped(model)
        raise ValueError(
            f"the model ({type(m).__name__}) is a decoder classifier whose head takes each row's logits at the last "
            "token that is not `model.config.pad_token_id`, and model.config.pad_token_id is None: padded batches "
            "would be read at a pad token (or refused by transformers). Set model.config.pad_token_id = "
            "tokenizer.pad_token_id (a tokenizer without a pad token: tokenizer.pad_token = tokenizer.eos_token "
            "first), as dupfast.harness.models.load_model does, and pad the batches with that id")
    return pid


def check_head_positions(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: Optional[int], where: str) -> None:
    """The position a decoder's head reads (the rightmost token whose id != pad_id) must be a real token
    (mask 1) in every row; it is a pad position when the batch is right-padded with another id."""
    if pad_id is None:
        return
    T = input_ids.shape[1]
    positions = torch.arange(T, device=input_ids.device)
    head = (positions * (input_ids != pad_id)).argmax(dim=1)
    real = mask.gather(1, head.unsqueeze(1)).squeeze(1).bool()
    if bool(real.all()):
        return
    r = int(torch.nonzero(~real)[0])
    used = sorted({int(v) for v in input_ids[r][mask[r] == 0].tolist()})
    last = int(T - 1 - mask[r].long().flip(0).argmax())
    raise ValueError(
        f"{where} row {r}: padded with token id {used[0] if len(used) == 1 else used}, but model.config.pad_token_id "
        f"is {pad_id}: the model's head would take this row's logits at padding position {int(head[r])}, not at "
        f"its last real token ({last}). Pad the batches with the model's pad id (tokenizer.pad_token_id == "
        "model.config.pad_token_id), or set model.config.pad_token_id to the id the batches are padded with")

"""Detection-guided unlearning for generative (causal) LMs: the siblings of dupfast.detect / dupfast.purify.

    batches = chat_batches(tokenizer, prompts)                       # prompt batches (chat template)
    clean = chat_batches(tokenizer, clean_prompts, clean_responses, labels=...)
    result = dupfast.detect_prompts(model, batches, clean=clean)     # mode: default | dup | dan (PromptStripDetector)
    purified, report = dupfast.purify_generative(model, batches, clean=clean, detection=result)

Siblings rather than a dispatch inside dupfast.detect / purify: the data differ (prompts and responses, not
labelled texts), detection has no class logits, purification generates the teacher's responses; a causal LM
given to dupfast.detect / purify gets an error naming these.
"""
from .config import GenerativeConfig  # noqa: F401
from .data import chat_batches, encode_prompt, encode_response  # noqa: F401
from .detect import PromptDetector, PromptStripDetector, detect_prompts  # noqa: F401
from .objective import vocab_kl  # noqa: F401
from .purify import purify_generative  # noqa: F401

__all__ = ["GenerativeConfig", "chat_batches", "encode_prompt", "encode_response", "PromptDetector",
           "PromptStripDetector", "detect_prompts", "vocab_kl", "purify_generative"]

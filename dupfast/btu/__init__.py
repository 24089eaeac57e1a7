"""BTU, Backdoor Token Unlearning (Jiang et al., AAAI 2025): a training-time backdoor defence.

Backdoor learning moves the word-embedding rows of trigger tokens far more than clean ones, and the attack
depends on those rows. BTU exposes the most-moved tokens (three cheap training rounds), fine-tunes, then
resets the suspicious tokens' moved dimensions to the pretrained pad embedding.

    suspects = dupfast.btu.expose("minilm", poisoned_train)          # ranked suspicious tokens
    model, report = dupfast.btu.train("minilm", poisoned_train, clean_tune=clean)   # defended model, BTUReport
    dupfast.btu.expose(model, loader, tokenizer=tok)                  # or a loader of labelled batches
    Trainer(model, args, train_dataset=ds, callbacks=[dupfast.btu.BTUCallback()])   # BTU in a HF Trainer
"""
from .embeddings import embedding_block, embedding_info, input_embeddings, replacement_id, vocab_size
from .expose import Exposure, ExposureConfig, Round, Suspect, expose
from .report import BTUReport
from .shallow import ShallowClassifier
from .train import BTUConfig, train
from .triggers import trigger_forms, trigger_ranks, trigger_tokens
from .unlearn import unlearn_tokens

__all__ = ["BTUCallback", "BTUConfig", "BTUReport", "Exposure", "ExposureConfig", "Round", "ShallowClassifier",
           "Suspect", "embedding_block", "embedding_info", "expose", "input_embeddings", "replacement_id", "train",
           "trigger_forms", "trigger_ranks", "trigger_tokens", "unlearn_tokens", "vocab_size"]


def __getattr__(name):
    # BTUCallback subclasses transformers.TrainerCallback, whose import costs seconds: loaded on first use
    if name == "BTUCallback":
        from .callback import BTUCallback
        return BTUCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""BTU end to end: expose suspicious tokens, fine-tune on the (possibly poisoned) data, unlearn the
suspicious tokens' moved embedding dimensions, and optionally clean-tune for one epoch.

    model, report = dupfast.btu.train("minilm", poisoned_train, clean_tune=clean_samples)   # report: BTUReport

The clean-tune step needs clean labelled data the defender holds; it is reported as its own step
(methods.md §2.5, §8.4), so results are available without it, after unlearning only, and with it.
"""
import contextlib
import copy
import dataclasses
import time
from typing import Callable

import torch

from ..batches import Rows, check_rows
from ..classifier import check_weights_loaded
from ..finetune import FinetuneConfig, fit
from ..purification.guard import ModelGuard
from .embeddings import input_embeddings, replacement_id, token_ids, vocab_size
from .expose import Exposure, ExposureConfig, expose_loaded
from .inputs import as_training_data, check_labels, label_set, resolve_model
from .report import BTUReport
from .unlearn import unlearn_tokens

# The authors' fine-tune and clean-tune recipe: all parameters, AdamW lr 2e-5, one epoch, batch 64.
FINETUNE = FinetuneConfig(epochs=1, lr=2e-5, batch_size=64, max_len=128, warmup_ratio=0.0, weight_decay=0.01,
                          seed=1234)
CLEAN_TUNE = FINETUNE


@dataclasses.dataclass(frozen=True)
class BTUConfig:
    exposure: ExposureConfig = ExposureConfig()
    finetune: FinetuneConfig = FINETUNE
    clean_tune: FinetuneConfig = CLEAN_TUNE
    replace_with: int | str | None = None   # token whose pretrained embedding fills moved dimensions
    # rank the exposure rounds by movement in excess of the same rounds on the clean-tune set (btu.expose's
    # `reference`; beyond the paper: it keeps a decoder's common tokens out of the suspects, README)
    expose_against_clean_tune: bool = False

    def __post_init__(self):
        if not isinstance(self.exposure, ExposureConfig):
            raise TypeError(f"BTUConfig.exposure must be an ExposureConfig, got {type(self.exposure).__name__}")
        for name in ("finetune", "clean_tune"):
            if not isinstance(getattr(self, name), FinetuneConfig):
                raise TypeError(f"BTUConfig.{name} must be a FinetuneConfig, "
                                f"got {type(getattr(self, name)).__name__}")


def _suspect_ids(suspects, vocab: int) -> list[int]:
    if isinstance(suspects, Exposure):
        return suspects.token_ids
    if isinstance(suspects, (str, bytes)) or not hasattr(suspects, "__iter__"):
        raise TypeError(f"suspects must be an Exposure or a list of token ids, got {type(suspects).__name__}")
    ids = list(suspects)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise TypeError("suspects must be token ids (ints)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"suspect token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    return ids


def _step(report, name, t0, evaluate, model, tok, **extra):
    entry = {"step": name, "seconds": round(time.perf_counter() - t0, 2), **extra}
    if evaluate is not None:
        entry["eval"] = evaluate(model, tok)
    report.steps.append(entry)


def train(model, train_data, clean_tune=None, *, tokenizer=None,
          config: BTUConfig | None = None, suspects=None, finetuned=None,
          evaluate: Callable | None = None):
    """Defended fine-tuning. Returns (model, BTUReport), as `dupfast.purify` returns (model, PurifyReport).

    model:         a *pretrained* model object with its `tokenizer=` (never modified; to load one by short
                   name: `dupfast.harness.models.load_model(name, n, seed=s)`).
    train_data:    (text, label) samples, or a loader of labelled batches (see btu.inputs).
    clean_tune:    optional clean labelled samples (or a loader) for the final one-epoch tune (labels must
                   be known).
    suspects:      an `Exposure` (or token ids) from an earlier `expose` call, to skip step 1.
    finetuned:     the model already fine-tuned on `train_data` from the same checkpoint (e.g. a cached
                   victim), to skip the fine-tune; it is unlearned in place and returned. On any failure
                   (an error, KeyboardInterrupt) it is restored exactly, as `dupfast.purify` restores its model.
    evaluate:      optional `f(model, tokenizer) -> dict`, run after every step and stored in the report.
    """
    config = BTUConfig() if config is None else config
    if not isinstance(config, BTUConfig):
        raise TypeError(f"config must be a BTUConfig, got {type(config).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError("evaluate must be a callable f(model, tokenizer) -> dict")
    train_set = as_training_data(train_data, "training set", tokenizer)
    tune_set = None
    if clean_tune is not None:
        tune_set = as_training_data(clean_tune, "clean-tune set", tokenizer)
        check_labels(tune_set, label_set(train_set), "the clean-tune set", "the training set")
    if config.expose_against_clean_tune and tune_set is None and suspects is None:
        raise ValueError("BTUConfig.expose_against_clean_tune ranks the exposure against the clean-tune set: "
                         "pass clean_tune= (clean labelled data) or set it False")
    if finetuned is not None:
        input_embeddings(finetuned)
        check_weights_loaded(finetuned, "BTU (finetuned=)")

    model, tok, num_labels = resolve_model(model, tokenizer, train_set)
    if finetuned is not None:
        _check_same_embeddings(model, finetuned)  # before the exposure rounds, not after them in unlearn_tokens
    if isinstance(tune_set, Rows):
        check_rows(tune_set, model, "the clean-tune set")
    vocab, pretrained, replace, report = start(model, tok, train_set, num_labels, config)

    ids = expose_step(model, tok, train_set, num_labels, config, tune_set, suspects, vocab, report)

    # Step 2a: ordinary fine-tuning on the poisoned data (the "without BTU" model)
    t0 = time.perf_counter()
    if finetuned is None:
        tuned = copy.deepcopy(model)  # our own copy: a failure leaves the caller nothing to restore
        losses = fit(tuned, tok, train_set, config.finetune, desc="BTU fine-tune")
        _step(report, "finetune", t0, evaluate, tuned, tok, trained=True, final_loss=losses[-1] if losses else None)
        guard = contextlib.nullcontext()
    else:
        tuned = finetuned
        # the caller's model, changed in place from here on: a transaction, as purify's (purification.guard)
        guard = ModelGuard(tuned)

    with guard as g:
        if finetuned is not None:
            _step(report, "finetune", t0, evaluate, tuned, tok, trained=False)
        unlearn_and_tune(tuned, tok, pretrained, ids, replace, vocab, tune_set, config, report, evaluate, g)
    return tuned, report


def start(model, tok, train_set, num_labels: int, config: BTUConfig):
    """What the defence holds before any training: (vocab, the pretrained embeddings [rows, dim] float32 on the
    model's device, the replacement token id, an empty BTUReport). Shared by `train` and `BTUCallback`."""
    vocab = vocab_size(model, tok)
    pretrained = input_embeddings(model).weight.detach().float().clone()
    replace = (next(iter(token_ids(tok, [config.replace_with]))) if config.replace_with is not None
               else replacement_id(tok))
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    report = BTUReport(model=str(name),
                       train_size=len(train_set), num_labels=num_labels, vocab_size=vocab,
                       config=dataclasses.asdict(config), torch_threads=torch.get_num_threads())
    return vocab, pretrained, replace, report


def expose_step(model, tok, train_set, num_labels: int, config: BTUConfig, tune_set, suspects, vocab: int,
                report) -> list:
    """Step 1: the suspect token ids, from the exposure rounds on the pretrained `model` (run here unless
    `suspects`, an Exposure or token ids, is given), recorded in `report`. Shared by `train` and `BTUCallback`."""
    t0 = time.perf_counter()
    if suspects is None:
        reference = tune_set if config.expose_against_clean_tune else None
        suspects = expose_loaded(model, tok, train_set, num_labels, config.exposure, reference)
        report.exposure = suspects.to_dict()
        report.steps.append({"step": "expose", "seconds": round(time.perf_counter() - t0, 2),
                             "rounds": {r.name: round(r.seconds, 2) for r in suspects.rounds}})
    elif isinstance(suspects, Exposure):
        report.exposure = suspects.to_dict()
    ids = _suspect_ids(suspects, vocab)
    report.suspects = [{"id": t, "token": tok.convert_ids_to_tokens(t)} for t in ids]
    return ids


def unlearn_and_tune(tuned, tok, pretrained, ids, replace, vocab, tune_set, config, report, evaluate, guard=None):
    """Steps 2b and 3 on the fine-tuned model, in place: unlearn the suspect ids' moved dimensions, then the
    optional clean tune, each recorded in `report`. `guard`: the ModelGuard the caller holds, told which
    tensors are about to be written (None: the model is the defence's own copy). Shared by `train` and
    `BTUCallback`, whose fine-tune is the Trainer's."""
    # Step 2b: dimension-wise unlearning of the suspicious tokens
    t0 = time.perf_counter()
    if guard is not None:
        guard.keep_tensors(_names_of(tuned, input_embeddings(tuned).weight))  # the rows unlearn_tokens writes
    info = unlearn_tokens(tuned, pretrained, ids, replace, vocab)
    info["replace_token"] = tok.convert_ids_to_tokens(replace)
    info["dims_replaced"] = [{"id": t, "token": tok.convert_ids_to_tokens(t), "dims": n}
                             for t, n in info["dims_replaced"].items()]
    _step(report, "unlearn", t0, evaluate, tuned, tok, **info)

    # Step 3 (optional): one epoch on clean data
    if tune_set is not None:
        t0 = time.perf_counter()
        if guard is not None:
            guard.keep_tensors([n for n, _ in tuned.named_parameters()])  # fit writes every weight
        losses = fit(tuned, tok, tune_set, config.clean_tune, desc="BTU clean-tune")
        _step(report, "clean_tune", t0, evaluate, tuned, tok, size=len(tune_set),
              final_loss=losses[-1] if losses else None)
    tuned.eval()


def _names_of(model, tensor) -> list:
    """The parameter names of `tensor` in `model` (every parameter when it is none of them)."""
    names = [n for n, p in model.named_parameters() if p is tensor]
    return names or [n for n, _ in model.named_parameters()]


def _check_same_embeddings(model, finetuned):
    a, b = input_embeddings(model).weight, input_embeddings(finetuned).weight
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"finetuned= has input embeddings {tuple(b.shape)}, the pretrained model {tuple(a.shape)}: "
                         "the fine-tuned model must come from the same checkpoint as `model`")

"""BTU inside a Hugging Face `Trainer`: the Trainer's own fine-tune on the (possibly poisoned) data is BTU's
fine-tune (step 2a); the callback runs the other steps around it.

    btu = dupfast.btu.BTUCallback(clean_tune=clean_ds)        # clean_tune optional (step 3)
    trainer = Trainer(model=pretrained, args=args, train_dataset=train_ds, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[btu])
    trainer.train()                 # exposure before the first step, unlearning after the last
    btu.report.suspects             # the unlearned tokens; btu.report: a BTUReport, as dupfast.btu.train's

on_train_begin, while the model is still the pretrained one: step 1, the exposure rounds (`expose`) on the
Trainer's training data (its train dataset read once through its data collator, in order) or on `train_data=`,
unless `suspects=` gives them; the pretrained word embeddings are kept. The rounds reseed the global random
generators (dupfast's fit); they are put back afterwards, so the Trainer trains exactly as it would without BTU.
on_train_end, after `load_best_model_at_end` has loaded the best checkpoint: step 2b, the suspects' moved
dimensions reset to the pretrained pad embedding, then step 3 when `clean_tune=` is given, one epoch on it; the
model is changed in place, as a transaction (restored exactly on any error). So `trainer.save_model()` and
`trainer.evaluate()` after `train()` see the defended model; evaluations and checkpoints written *during*
training see the model before unlearning.

The same steps as `dupfast.btu.train(model, data, clean_tune, tokenizer=tok, finetuned=trained)` (shared code,
train.py): the Trainer's fine-tune replaces BTUConfig.finetune. dupfast's own training loops (the exposure rounds,
the clean tune) run on the CPU; a model the Trainer placed on an accelerator is copied to the CPU for them (the
Trainer's model itself is never moved). Every process of a multi-process run computes the same exposure.
"""
import contextlib
import copy
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from ..batches import DATASET_BATCH, Rows, check_rows
from ..purification.guard import ModelGuard
from .embeddings import input_embeddings
from .inputs import as_training_data, check_labels, label_set, resolve_model
from .report import BTUReport
from .train import BTUConfig, expose_step, start, unlearn_and_tune


# the TrainingArguments recorded in the report as the fine-tune's recipe
TRAINER_RECIPE = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type", "seed")


@contextlib.contextmanager
def same_random_state():
    """Every global generator (python, numpy, torch CPU and initialised CUDA devices) as it was on entry, on exit:
    the exposure rounds reseed them (finetune.fit), and the Trainer's fine-tune must draw the data order and
    dropout masks it would draw without BTU."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _plain(value):
    """A TrainingArguments value as JSON data (lr_scheduler_type is an Enum)."""
    return getattr(value, "value", value)


def _device(model) -> torch.device:
    return input_embeddings(model).weight.device


def _on_cpu(model):
    """The model itself when it is on the CPU, else a CPU copy: dupfast's training loops feed CPU batches."""
    return model if _device(model).type == "cpu" else copy.deepcopy(model).to("cpu")


def _tokenizer_of(processing_class):
    """The tokenizer of a Trainer's processing_class (a tokenizer, or a processor that holds one), else None."""
    for cand in (processing_class, getattr(processing_class, "tokenizer", None)):
        if cand is not None and hasattr(cand, "convert_ids_to_tokens"):
            return cand
    return None


def trainer_loader(train_dataloader):
    """The Trainer's training data as a plain, ordered DataLoader over the same dataset and collator (its own
    dataloader is not iterated: under accelerate that advances its epoch counter and the sampler's seed)."""
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None:
        raise ValueError("BTUCallback could not find the Trainer's training data (no train_dataloader.dataset): "
                         "pass BTUCallback(train_data=...), the training set as samples, batches or a Dataset")
    collate = getattr(train_dataloader, "collate_fn", None)
    return torch.utils.data.DataLoader(dataset, batch_size=DATASET_BATCH, shuffle=False, collate_fn=collate)


class BTUCallback(TrainerCallback):
    """Backdoor Token Unlearning for a `transformers.Trainer` that fine-tunes a *pretrained* model on data that may
    be poisoned (module docstring). After `trainer.train()`, `report` is the BTUReport (suspects, per step).

    tokenizer:  the model's tokenizer; default: the Trainer's `processing_class`.
    train_data: the data the exposure rounds read; default: the Trainer's train dataset through its collator.
                (text, label) samples, a loader of labelled batches or a `datasets.Dataset` (unpadded rows are
                padded with the tokenizer).
    clean_tune: optional clean labelled data (the same forms) for step 3, one epoch of `config.clean_tune`.
    config:     a BTUConfig: its exposure, clean_tune, replace_with and expose_against_clean_tune apply; its
                finetune does not (the Trainer's arguments are the fine-tune).
    suspects:   an Exposure (or token ids) from an earlier `dupfast.btu.expose` on the same pretrained model, to
                skip the exposure rounds.
    evaluate:   optional f(model, tokenizer) -> dict, run after every step of the defence, stored in the report.
    """

    def __init__(self, *, tokenizer=None, train_data=None, clean_tune=None, config: Optional[BTUConfig] = None,
                 suspects=None, evaluate: Optional[Callable] = None):
        config = BTUConfig() if config is None else config
        if not isinstance(config, BTUConfig):
            raise TypeError(f"config must be a BTUConfig, got {type(config).__name__}")
        if evaluate is not None and not callable(evaluate):
            raise TypeError("evaluate must be a callable f(model, tokenizer) -> dict")
        if config.expose_against_clean_tune and clean_tune is None and suspects is None:
            raise ValueError("BTUConfig.expose_against_clean_tune ranks the exposure against the clean-tune set: "
                             "pass clean_tune= (clean labelled data) or set it False")
        self.tokenizer, self.train_data, self.clean_tune = tokenizer, train_data, clean_tune
        self.config, self.suspects, self.evaluate = config, suspects, evaluate
        self.report: Optional[BTUReport] = None
        self._held = None   # from on_train_begin to on_train_end: what the unlearning needs
        self._done = False

    # ---- step 1, before the Trainer's first step -----------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs):
        if self._done:
            raise RuntimeError("BTUCallback already unlearned this model at the end of an earlier train(); BTU "
                               "starts from the pretrained model: make a new Trainer and BTUCallback from it")
        if state.global_step > 0:
            raise ValueError(f"BTUCallback starts from the pretrained model, but this run resumes at step "
                             f"{state.global_step} (resume_from_checkpoint): its embeddings are no longer the "
                             "pretrained ones. Train from the start, or unlearn the finished model with "
                             "dupfast.btu.train(pretrained, data, tokenizer=tok, finetuned=model)")
        if model is None:
            raise ValueError("BTUCallback got no model from the Trainer")
        if self._held is not None:  # an earlier train() stopped between on_train_begin and on_train_end
            self._check_still_pretrained(model)
            self._held["began"] = time.perf_counter()
            return  # it stopped before its first step: the exposure still holds
        tok = self.tokenizer if self.tokenizer is not None else _tokenizer_of(processing_class)
        if tok is None:
            raise ValueError("BTUCallback needs the model's tokenizer: pass Trainer(processing_class=tokenizer) or "
                             "BTUCallback(tokenizer=tokenizer)")
        with same_random_state():
            self._begin(args, model, tok, train_dataloader)

    def _begin(self, args, model, tok, train_dataloader):
        # iterating a DataLoader draws a seed: the rounds then start from the generators as Trainer.train() seeded
        # them, the same exposure as `transformers.set_seed(args.seed); dupfast.btu.expose(...)`
        with same_random_state():
            data = self.train_data if self.train_data is not None else trainer_loader(train_dataloader)
            train_set = as_training_data(data, "training set", tok)
            tune_set = None
            if self.clean_tune is not None:
                tune_set = as_training_data(self.clean_tune, "clean-tune set", tok)
                check_labels(tune_set, label_set(train_set), "the clean-tune set", "the training set")
        if (self.config.expose_against_clean_tune and self.suspects is None
                and isinstance(tune_set, Rows) != isinstance(train_set, Rows)):
            raise TypeError("expose_against_clean_tune ranks against the clean-tune set, which must come in the "
                            "training data's form: both (text, label) samples or both batches / Datasets")
        model, tok, num_labels = resolve_model(model, tok, train_set)
        if isinstance(tune_set, Rows):
            check_rows(tune_set, model, "the clean-tune set")

        work = _on_cpu(model)
        vocab, pretrained, replace, report = start(work, tok, train_set, num_labels, self.config)
        # the fine-tune is the Trainer's: its recipe, not BTUConfig.finetune
        report.config["finetune"] = {"trainer": True, **{k: _plain(getattr(args, k, None)) for k in TRAINER_RECIPE}}
        ids = expose_step(work, tok, train_set, num_labels, self.config, tune_set, self.suspects, vocab, report)
        self.report = report
        self._held = {"tok": tok, "pretrained": pretrained, "replace": replace, "vocab": vocab, "ids": ids,
                      "tune_set": tune_set, "began": time.perf_counter()}

    def _check_still_pretrained(self, model):
        weight = input_embeddings(model).weight.detach().float().cpu()
        if not torch.equal(weight, self._held["pretrained"]):
            raise RuntimeError("BTUCallback saw this model pretrained in an earlier train() that did not finish, "
                               "and its embeddings have been trained since: BTU needs the pretrained model at the "
                               "start. Make a new Trainer and BTUCallback from the pretrained model")

    # ---- steps 2b and 3, after the Trainer's last step -----------------------------------------------------

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._held is None:
            raise RuntimeError("BTUCallback.on_train_end without on_train_begin: pass the callback to the Trainer "
                               "before train() (Trainer(callbacks=[BTUCallback()]) or trainer.add_callback)")
        held, report = self._held, self.report
        report.steps.append({"step": "finetune", "trained": True, "trainer": True,
                             "seconds": round(time.perf_counter() - held["began"], 2),
                             "global_step": int(state.global_step)})
        if self.evaluate is not None:
            report.steps[-1]["eval"] = self.evaluate(model, held["tok"])
        work = _on_cpu(model)
        with ModelGuard(work) as guard:  # in place on the caller's model: restored exactly on any error
            unlearn_and_tune(work, held["tok"], held["pretrained"], held["ids"], held["replace"], held["vocab"],
                             held["tune_set"], self.config, report, self.evaluate, guard)
        if work is not model:
            with torch.no_grad():
                model.load_state_dict(work.state_dict())
            model.eval()
        self._held, self._done = None, True

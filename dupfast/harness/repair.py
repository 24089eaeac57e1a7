"""Measure the repair, not only the ASR (issue 30).

A purified model can *invert* its trigger instead of forgetting it ("trigger shifting"): the trigger then
pushes inputs away from the target, towards another class. ASR (triggered NON-target inputs predicted as the
target) cannot see this: it drops to 0 either way. So the repair is measured here on a triggered copy of the
WHOLE test set (every class, true labels kept), against what a clean fine-tune does on the same copy:

    rows = triggered_copy(test_clean, attack, seed, target)          every class, trigger inserted
    ref = triggered_predictions(clean_model, tok, test_clean, attack, target)   once, for every model
    evaluate_repair(purified, tok, test_clean, attack, target, reference_preds=ref)
        -> CACC, ASR, triggered accuracy (overall, per class), confusion, and against the reference:
           shift = ASR - reference ASR (negative = anti-trigger), per-class accuracy gap, agreement

and by relearning: a backdoor that is really gone comes back as slowly as a fresh one is planted, one that
is only hidden comes back within a few steps of ordinary fine-tuning on k poisoned rows:

    poison = poison_sample(clean_rows, attack, k, target, seed)
    relearn_asr(purified, tok, clean_rows, poison, test_poison, target, RelearnConfig(steps=60))
"""
import copy
import dataclasses
import math
import numbers
import time
from typing import Sequence

import numpy as np
import torch

from ..batches import forward_inputs
from ..batching import TextBatcher, predict
from ..finetune import _check_types, seed_everything
from ..samples import Sample, validate
from .attacks import StyleBkd, _as_samples, _check_attack, _rng
from .metrics import _np, cacc


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Integral)


# ---- the triggered copy -------------------------------------------------------------------------

def triggered_copy(samples: Sequence, attack, seed: int = 0, target: int | None = None,
                   name: str = "test") -> list[Sample]:
    """Every sample (every class, in order) with the trigger inserted, its TRUE label kept, poison_label 1.

    With `target`, the non-target rows get exactly the texts of `attacks.poison_eval(samples, attack, target,
    seed, name)` (same random stream, same order), so the ASR read off this copy is the usual ASR, and the
    target rows draw from a stream of their own; without it every row draws from poison_eval's stream in
    turn. The input is not mutated."""
    _check_attack(attack)
    if isinstance(attack, StyleBkd):
        raise ValueError("a triggered copy needs an attack that can insert its trigger into any text; StyleBkd "
                         "exists only as precomputed poisoned sets, which hold the non-target test rows alone "
                         "(no triggered target-class rows). Use BadNets or AddSent.")
    rows = _as_samples(samples, f"{name} set")
    if not rows:
        raise ValueError(f"{name} set is empty")
    if target is not None and not _is_int(target):
        raise ValueError(f"target label must be an integer or None, got {target!r}")
    rest = _rng(seed, f"insert-{name}")             # poison_eval's stream: the same triggered texts
    own = _rng(seed, f"insert-{name}-target-class")  # target rows: poison_eval never triggers them
    return [Sample(attack.insert(s.text, own if s.label == target else rest), s.label, 1) for s in rows]


# ---- the metrics --------------------------------------------------------------------------------

def _class_vector(x, name: str, num_classes: int) -> np.ndarray:
    """A 1-D vector of class ids in [0, num_classes); floats are refused, not rounded (a caller error)."""
    a = _np(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of class ids, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), "
                         f"got range [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def repair_metrics(preds, labels, target: int, num_classes: int, reference=None) -> dict:
    """The repair as seen on a triggered copy of the whole test set (`triggered_copy`).

    preds: the model's predictions on the copy; labels: the TRUE labels; reference: a clean fine-tune's
    predictions on the same copy (optional). Returns
      asr                   share of non-target rows predicted as the target (the usual ASR)
      triggered_accuracy    accuracy on the copy; per_class[c]["accuracy"] per true class (NaN for a class
                            with no row), with its count "n" and "predicted_target" (share sent to the target)
      confusion             [true][predicted] counts: where the trigger sends each class
    and with `reference`:
      reference_asr, reference_triggered_accuracy, agreement (share of rows predicted as the reference does)
      shift                 asr - reference_asr: negative = the trigger now pushes AWAY from the target
      per_class[c]          + reference_accuracy, accuracy_gap (model minus reference), agreement
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_int(target) or not 0 <= target < num_classes:
        raise ValueError(f"target must be a class id in [0, {num_classes}), got {target!r}")
    p = _class_vector(preds, "predictions", num_classes)
    y = _class_vector(labels, "labels", num_classes)
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({y.size}) differ in length")
    nontarget = y != target
    if not nontarget.any():
        raise ValueError(f"every row is labelled with the target {target}; ASR needs non-target rows")
    ref = None
    if reference is not None:
        ref = _class_vector(reference, "reference predictions", num_classes)
        if ref.shape != y.shape:
            raise ValueError(f"reference predictions ({ref.size}) and labels ({y.size}) differ in length; "
                             "they must be the reference model's predictions on the same triggered copy")
    out = {"n": int(y.size), "num_classes": int(num_classes), "target": int(target),
           "asr": _rate(p[nontarget] == target), "triggered_accuracy": _rate(p == y),
           "per_class": {}, "confusion": np.bincount(y * num_classes + p, minlength=num_classes ** 2)
           .reshape(num_classes, num_classes).tolist()}
    for c in range(num_classes):
        rows = y == c
        out["per_class"][c] = {"n": int(rows.sum()), "accuracy": _rate(p[rows] == c),
                               "predicted_target": _rate(p[rows] == target)}
    if ref is not None:
        out.update(_against_reference(p, y, ref, target, out["per_class"]))
    return out


def _against_reference(p, y, ref, target, per_class) -> dict:
    ref_asr = _rate(ref[y != target] == target)
    for c, row in per_class.items():
        rows = y == c
        row["reference_accuracy"] = _rate(ref[rows] == c)
        row["accuracy_gap"] = row["accuracy"] - row["reference_accuracy"]  # NaN for an empty class
        row["agreement"] = _rate(p[rows] == ref[rows])
    return {"reference_asr": ref_asr, "reference_triggered_accuracy": _rate(ref == y),
            "agreement": _rate(p == ref), "shift": _rate(p[y != target] == target) - ref_asr}


# ---- evaluating a model -------------------------------------------------------------------------

def _num_classes(model) -> int:
    n = getattr(getattr(model, "config", None), "num_labels", None)
    if not _is_int(n):
        raise ValueError("the model has no config.num_labels; is it a sequence classifier?")
    return int(n)


def triggered_predictions(model, tokenizer, test_clean: Sequence, attack, target: int, seed: int = 0,
                          max_len: int = 64, batch_size: int = 64) -> torch.Tensor:
    """The model's predictions on `triggered_copy(test_clean, attack, seed, target)`: compute a clean
    fine-tune's once and pass them as `reference_preds` to `evaluate_repair` for every purified model."""
    rows = triggered_copy(test_clean, attack, seed, target)
    return predict(model, tokenizer, [s.text for s in rows], batch_size, max_len)


def evaluate_repair(model, tokenizer, test_clean: Sequence, attack, target: int, reference_model=None,
                    seed: int = 0, max_len: int = 64, batch_size: int = 64, reference_preds=None,
                    reference_tokenizer=None) -> dict:
    """CACC on `test_clean`, and `repair_metrics` on its triggered copy (every class, true labels), against
    the clean reference when `reference_model` (predicted here) or `reference_preds` (from
    `triggered_predictions` with the same attack, seed and target) is given. Also asr_floor: the share of
    CLEAN non-target rows already predicted as the target (as `victims.evaluate_backdoor`)."""
    if reference_model is not None and reference_preds is not None:
        raise ValueError("give reference_model or reference_preds, not both")
    test_clean = _as_samples(test_clean, "clean test set")
    validate(test_clean, "clean test set", min_classes=1)
    labels = torch.tensor([s.label for s in test_clean])
    clean_pred = predict(model, tokenizer, [s.text for s in test_clean], batch_size, max_len)
    trig_pred = triggered_predictions(model, tokenizer, test_clean, attack, target, seed, max_len, batch_size)
    if reference_model is not None:
        reference_preds = triggered_predictions(reference_model, reference_tokenizer or tokenizer, test_clean,
                                                attack, target, seed, max_len, batch_size)
    nontarget = labels != target
    out = {"cacc": cacc(clean_pred, labels), "asr_floor": _rate((clean_pred[nontarget] == target).numpy()),
           "test_size": len(test_clean)}
    out.update(repair_metrics(trig_pred, labels, target, _num_classes(model), reference_preds))
    return out


# ---- relearning ---------------------------------------------------------------------------------

def poison_sample(rows: Sequence, attack, k: int, target: int, seed: int = 0) -> list[Sample]:
    """k non-target rows (drawn with a seeded stream), trigger inserted, label := target, poison_label 1:
    the dirty-label rows an attacker adds to relearn the backdoor. k = 0 (none) is the control run."""
    _check_attack(attack)
    rows = _as_samples(rows, "relearning rows")
    if not _is_int(target):
        raise ValueError(f"target label must be an integer, got {target!r}")
    if not _is_int(k) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    cands = [i for i, s in enumerate(rows) if s.label != target]
    if k > len(cands):
        raise ValueError(f"k={k} poisoned rows asked but only {len(cands)} of the {len(rows)} rows are "
                         f"non-target (label != {target})")
    _rng(seed, "relearn-select").shuffle(cands)
    rng = _rng(seed, "relearn-insert")
    return [Sample(attack.insert(rows[i].text, rng), int(target), 1) for i in sorted(cands[:k])]


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    """Plain full fine-tuning for exactly `steps` optimizer steps (AdamW, linear warm-up then decay to 0 as
    in `dupfast.finetune.fit`), cycling through the shuffled data; ASR is measured after each step of
    `eval_at` (0 = before any step; default: 0, a quarter and half of the steps) and always after the last."""
    steps: int = 60
    batch_size: int = 16
    lr: float = 2e-5
    max_len: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    eval_at: tuple | None = None
    eval_batch_size: int = 64

    def __post_init__(self):
        _check_types(self)
        for field in ("steps", "batch_size", "max_len", "eval_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"RelearnConfig.{field} must be >= 1, got {getattr(self, field)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"RelearnConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"RelearnConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"RelearnConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"RelearnConfig.grad_clip must be > 0, got {self.grad_clip}")
        at = (0, self.steps // 4, self.steps // 2) if self.eval_at is None else self.eval_at
        at = (at,) if _is_int(at) else at
        if not isinstance(at, (tuple, list)) or not all(_is_int(s) and 0 <= s <= self.steps for s in at):
            raise ValueError(f"RelearnConfig.eval_at must be step numbers in [0, steps={self.steps}], "
                             f"got {self.eval_at!r}")
        object.__setattr__(self, "eval_at", tuple(sorted(set(at))))


def _cycle(batcher, batch_size: int, seed: int):
    """Shuffled passes over the data, one after another, each with its own seed (as fit's epochs)."""
    epoch = 0
    while True:
        yield from batcher.batches(batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def _check_relearn_data(rows, poison, test_poison, target, num_labels):
    if not _is_int(target) or not 0 <= target < num_labels:
        raise ValueError(f"target must be a class id in [0, {num_labels}), got {target!r}")
    if not rows:
        raise ValueError("no relearning rows: clean_rows and poison_rows are both empty")
    bad = [s.label for s in rows if not 0 <= s.label < num_labels]
    if bad:
        raise ValueError(f"relearning labels must lie in [0, {num_labels}) (the model's num_labels), got {bad[0]}")
    if any(s.label != target for s in poison):
        raise ValueError(f"every poisoned row must carry the target label {target} (dirty-label); "
                         "build them with poison_sample")
    if not test_poison:
        raise ValueError("poisoned test set is empty")
    if any(s.label != target for s in test_poison):
        raise ValueError(f"the poisoned test set must hold triggered non-target rows labelled {target} "
                         "(attacks.poison_eval), not a triggered copy with true labels")


def relearn_asr(model, tokenizer, clean_rows: Sequence, poison_rows: Sequence, test_poison: Sequence,
                target: int, cfg: RelearnConfig = RelearnConfig(), return_model: bool = False) -> dict:
    """Fine-tune a deep copy of `model` (the caller's model is left untouched) on clean_rows + poison_rows
    for exactly cfg.steps steps, and measure how fast the ASR on `test_poison` comes back.

    Returns {"k": len(poison_rows), "steps", "asr" (after the last step), "asr_curve" ({step: ASR} at
    cfg.eval_at and the last step), "losses" (one per step), "seconds"}, and the relearned copy as "model"
    when return_model. Seeds the global RNGs with cfg.seed (dropout), as `fit` does."""
    t0 = time.perf_counter()
    clean, poison = _as_samples(clean_rows, "clean rows"), _as_samples(poison_rows, "poison rows")
    test_poison = _as_samples(test_poison, "poisoned test set")
    rows = clean + poison
    _check_relearn_data(rows, poison, test_poison, target, _num_classes(model))
    net = copy.deepcopy(model)
    # plain FULL fine-tuning: an attacker's ordinary fine-tune trains every weight, whatever a defence froze
    for p in net.parameters():
        p.grad = None
        if p.is_floating_point():
            p.requires_grad_(True)
    seed_everything(cfg.seed)
    texts = [s.text for s in test_poison]

    def asr() -> float:
        pred = predict(net, tokenizer, texts, cfg.eval_batch_size, cfg.max_len)
        return int((pred == target).sum()) / len(pred)

    curve = {}

    def measure(step: int):
        if step in cfg.eval_at or step == cfg.steps:
            curve[step] = asr()

    measure(0)
    losses = _train_steps(net, tokenizer, rows, cfg, on_step=measure)
    out = {"k": len(poison), "steps": len(losses), "asr": curve[cfg.steps], "asr_curve": curve,
           "losses": losses, "seconds": round(time.perf_counter() - t0, 3)}
    if return_model:
        out["model"] = net
    return out


def _train_steps(model, tokenizer, rows, cfg: RelearnConfig, on_step) -> list:
    """cfg.steps AdamW steps over `rows` (cycled), fit's schedule and clipping; on_step(s) after step s."""
    from transformers import get_linear_schedule_with_warmup

    batcher = TextBatcher(tokenizer, [s.text for s in rows], [s.label for s in rows], cfg.max_len)
    takes, device = forward_inputs(model), next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    batches = _cycle(batcher, cfg.batch_size, cfg.seed)
    losses = []
    for step in range(1, cfg.steps + 1):
        model.train()  # again after each evaluation, which leaves it in eval mode
        batch = next(batches)
        inputs = {k: batch[k].to(device) for k in takes if k in batch}
        loss = model(**inputs, labels=batch["labels"].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step(step)
    model.eval()
    return losses

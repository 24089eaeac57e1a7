"""DUP purification: detection-guided LoRA unlearning of a backdoored classifier, with no external model.

    purified = dupfast.purify(model, pool_loader, clean=clean_loader, detection=result)
    purified.dupfast_report            # PurifyReport: what was done, losses, stop reason, timings

Flow: pool rows + the detector's flags -> flagged rows; clean rows with labels; a token-hash split of each
into training and held-out rows; LoRA adapters on the attention projections (head trainable); the
teacher's logits cached once with the adapters disabled; −λ_asr·KL(p_T‖p_S) on flagged rows +
λ_acc·CE on clean rows; stop/select on held-out flagged agreement and held-out clean accuracy;
merge_and_unload. The model is purified IN PLACE (a second copy of the weights is never made) and returned.
"""
import sys
import time
import types
import warnings

import torch

from .. import distributed as dist
from ..batches import collect, model_device, model_num_labels
from .config import PurifyConfig
from .lora import attach_lora, find_target_modules, merge, trainable_parameters
from .report import PurifyReport
from .rows import require_clean_rows, select_flagged, split_holdout
from .trainer import cache_teacher, predict_rows, train

__all__ = ["purify", "PurifyConfig", "PurifyReport", "find_target_modules"]


def _num_labels(model) -> int:
    n = model_num_labels(model)
    if n is None or n < 2:
        raise ValueError("purify needs a sequence classifier whose config.num_labels >= 2 "
                         f"(got {n!r}); e.g. AutoModelForSequenceClassification")
    return n


def _pad_id(model) -> int:
    pid = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pid) if pid is not None else 0


def purify(model, loader, clean=None, detection=None, config: PurifyConfig = None, **overrides):
    """Purify `model` in place and return it (merged, eval mode) with `.dupfast_report` attached.

    loader: the suspicious pool (batches: any Mapping with input_ids, attention_mask[, index], as
    `dupfast.batches` reads them; a `datasets.Dataset` too); clean: labelled clean rows (the same, with
    labels) — the defender's own, never the evaluation sets;
    detection: a `dupfast.detect` result (uses `.flags`) or a bool [N] vector over the pool; None runs
    `dupfast.detect(model, loader, clean=clean)` first (the loaders must then be re-iterable).
    config / **overrides: PurifyConfig fields (e.g. lambda_asr=0 for clean LoRA fine-tuning)."""
    t_total = time.perf_counter()
    cfg = (config or PurifyConfig()).replace(**overrides) if overrides else (config or PurifyConfig())
    if not isinstance(cfg, PurifyConfig):
        raise TypeError(f"config must be a PurifyConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a HF sequence classifier), got {type(model).__name__}")
    if clean is None:
        raise ValueError("purify needs a labelled clean set (clean=...): its cross-entropy term protects clean "
                         "accuracy and its held-out part drives the stopping rule")
    num_labels, pad_id, device = _num_labels(model), _pad_id(model), model_device(model)
    if cfg.use_lora:
        find_target_modules(model, cfg.target_modules)  # fail on an unsupported model before any work
    report = PurifyReport(config=cfg.to_dict(), world_size=dist.world_size())

    if detection is None:
        import dupfast
        t0 = time.perf_counter()
        detection = dupfast.detect(model, loader, clean=clean)
        report.timings["detect_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    pool_rows, row_ids = collect(loader, "pool", model=model)
    flagged = select_flagged(pool_rows, row_ids, detection)
    del pool_rows
    clean_rows, _ = collect(clean, "clean", need_labels=True, model=model, num_labels=num_labels)
    require_clean_rows(clean_rows)
    n_pool, n_flag, n_clean = (int(v) for v in dist.reduce_numbers([len(row_ids), len(flagged), len(clean_rows)]))
    report.data = {"pool": n_pool, "flagged": n_flag, "clean": n_clean, "num_labels": num_labels}
    report.timings["collect_s"] = round(time.perf_counter() - t0, 3)

    if n_flag == 0:
        msg = "the detection flagged no input of the pool: nothing to unlearn, the model is returned unchanged"
        warnings.warn(msg, UserWarning, stacklevel=2)
        report.warnings.append(msg)
        report.stop_reason = "no flagged inputs"
        report.timings["total_s"] = round(time.perf_counter() - t_total, 3)
        model.dupfast_report = report
        return model

    flag_train, flag_hold = split_holdout(flagged, cfg.holdout_fraction)
    clean_train, clean_hold = split_holdout(clean_rows, cfg.holdout_fraction)
    counts = [int(v) for v in dist.reduce_numbers([len(flag_train), len(flag_hold), len(clean_train), len(clean_hold)])]
    report.data.update(flagged_train=counts[0], flagged_holdout=counts[1], clean_train=counts[2],
                       clean_holdout=counts[3])
    if counts[1] == 0 or counts[3] == 0:
        # too few rows to hold any out: the stopping rule then reads the training rows themselves
        msg = (f"held-out sets are empty (flagged {counts[1]}, clean {counts[3]}): the stopping rule uses the "
               "training rows")
        if cfg.holdout_fraction > 0:
            warnings.warn(msg, UserWarning, stacklevel=2)
        report.warnings.append(msg)
        flag_hold, clean_hold = flagged, clean_rows
    report.data["eval_rows"] = "holdout" if counts[1] and counts[3] else "train"

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        if cfg.use_lora:
            student, family, targets = attach_lora(model, cfg)
        else:
            student, family, targets = model, "full", []
            for p in student.parameters():
                p.requires_grad_(True)
        n_train = sum(p.numel() for _, p in trainable_parameters(student))
        report.model = {"family": family, "target_modules": targets, "trainable_params": n_train,
                        "total_params": sum(p.numel() for p in student.parameters()), "lora": cfg.use_lora}

        t0 = time.perf_counter()
        teacher_train, teacher_hold, teacher_clean = cache_teacher(
            student, [flag_train, flag_hold, clean_train if cfg.lambda_keep > 0 else clean_train.subset([])],
            pad_id, device)
        report.timings["teacher_s"] = round(time.perf_counter() - t0, 3)

        torch.manual_seed(cfg.seed + dist.rank())  # dropout differs across ranks, as with separate batches
        data = {"flag_train": flag_train, "flag_hold": flag_hold, "clean_train": clean_train,
                "clean_hold": clean_hold, "teacher_flag_train": teacher_train, "teacher_flag_hold": teacher_hold,
                "teacher_clean_train": teacher_clean}
        train(student, data, cfg, pad_id, device, report)

    t0 = time.perf_counter()
    check_rows = flag_hold if len(flag_hold) else clean_hold
    check_rows = check_rows.subset(range(min(len(check_rows), 64)))
    before = predict_rows(student, check_rows, pad_id, device) if len(check_rows) else None
    purified = merge(student)
    purified.eval()
    if before is not None:
        after = predict_rows(purified, check_rows, pad_id, device)
        report.merge_check = {"rows": len(check_rows), "max_abs_logit_diff": float((after - before).abs().max()),
                              "argmax_equal": bool((after.argmax(-1) == before.argmax(-1)).all())}
    report.timings["merge_s"] = round(time.perf_counter() - t0, 3)
    report.timings["total_s"] = round(time.perf_counter() - t_total, 3)
    purified.dupfast_report = report
    return purified


class _CallableModule(types.ModuleType):
    """`dupfast.purify` is this package once any submodule is imported; calling it calls `purify`."""

    def __call__(self, *args, **kwargs):
        return purify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""The one-call entry point.

    purified, report = dupfast.purify(model, pool_loader, clean=clean_loader, detection=result)

Flow: every input is read and checked first (pool and clean rows against the model, the detection matched
to the pool), the flagged and clean rows split into training and held-out rows by token hash, and the
teacher's logits taken once from the model as given (the detection's own logits on the flagged rows, when
they are this model's). Only then is the model touched, inside a transaction (guard.ModelGuard): LoRA adapters
on the attention projections (head trainable) with the teacher = adapters disabled; −λ_asr·KL(p_T‖p_S) on
flagged rows + λ_keep·KL + λ_acc·CE on clean rows; stop/select on held-out flagged agreement and held-out
clean accuracy; merge_and_unload. The model is purified IN PLACE (no second copy of the weights) and
returned with the report; if anything fails, it is left exactly as it was.
"""
import time
import warnings

import torch

from .. import distributed as dist
from ..batches import check_rows, model_device, model_num_labels, padded
from ..classifier import check_classifier, check_pad_token
from .checks import (check_student_logits, check_teacher_logits, require_clean_size, require_reiterable,
                     warn_flag_share)
from .config import PurifyConfig
from .guard import ModelGuard
from .invariance import NO_CANDIDATE, check_candidates, concat, detect_candidates, invariance_rows
from .lora import attach_student, find_target_modules, merge, trainable_parameters
from .report import PurifyReport
from .rows import match_detection, read_rows, require_clean_rows, split_holdout
from .teacher import check_detection_logits, probe, teacher_logits
from .trainer import TrainData, predict_rows, train


def purify(model, loader, clean=None, detection=None, config: PurifyConfig = None, force: bool = False,
           tokenizer=None, triggers=None, **overrides):
    """Purify `model` in place. Returns (model, PurifyReport): the model merged and in eval mode, the report
    of what was done (data, losses, stopping, timings).

    loader: the suspicious pool (batches: any Mapping with input_ids, attention_mask[, index], as
    `dupfast.batches` reads them; a `datasets.Dataset`; or `dupfast.batches.Rows`, token rows without padding);
    clean: labelled clean rows (the same, with labels) — the defender's own, never the evaluation sets; at least
    checks.min_clean_rows(holdout_fraction) of them (8 at the default 0.25), for the stopping rule's held-out part;
    detection: a `dupfast.detect` result (its flags, and its logits as the teacher's on the flagged rows) or a
    bool [N] vector over the pool; None runs `dupfast.detect(model, loader, clean=clean)` first (the loaders
    must then be re-iterable).
    config / **overrides: PurifyConfig fields (e.g. lambda_asr=0 for clean LoRA fine-tuning).
    force: unlearn the flagged inputs even when the detection's verdict is "no evidence of poison" (by default the
    model is then returned unchanged, report.stop_reason saying why: a clean model is not "purified" on clean rows).
    Warns (checks.NearlyAllFlaggedWarning) when more than 90% of the pool is flagged.
    Raises before touching the model on bad input (NaN / inf logits of the model as given included); on a failure
    after that (NaN / inf logits of the purified model included), restores it exactly and re-raises.
    tokenizer: the model's tokenizer, to pad batches whose rows are of different lengths (a `datasets.Dataset`
    of an unpadded `ds.map(tokenize)`; `dupfast.batches.padded`); without it such rows are an error.
    triggers: trigger candidates (words or short phrases, or `dupfast.triggers` results; needs `tokenizer`): each
    clean training row gets a copy with one of them inserted, trained toward the clean row's teacher logits and
    label, so the purified model forgets the trigger instead of inverting it (invariance.py). "auto": the
    candidates `dupfast.triggers` finds in the decoded pool (flagged vs kept rows, the model's flip rate), chosen by
    `invariance.insertable` and listed in report.triggers. None: no copies."""
    loader, clean = padded(loader, tokenizer), padded(clean, tokenizer)
    t_total = time.perf_counter()
    cfg = _config(config, overrides)
    num_labels, pad_id, device = _check_model(model, cfg)
    if clean is None:
        raise ValueError("purify needs a labelled clean set (clean=...): its cross-entropy term protects clean "
                         "accuracy and its held-out part drives the stopping rule")
    if detection is None:
        require_reiterable("purify", pool=loader, clean=clean)  # read by the detection, then again here
    # everything after this point may touch the model (detection, teacher passes, adapters, training, merge):
    # on any failure the guard puts it back exactly
    with ModelGuard(model, copy_weights=not cfg.use_lora) as guard:
        return _purify(model, loader, clean, detection, cfg, guard, num_labels, pad_id, device, t_total, force,
                       tokenizer, triggers)


def no_poison_reason(detection, force: bool):
    """The sentence why nothing is unlearned, when the detection's verdict says no poison (None: go on)."""
    verdict = getattr(detection, "verdict", None)
    if force or verdict is None or verdict.poison_present is not False:
        return None
    return (f"{verdict.sentence()}; nothing was unlearned and the model is returned unchanged (pass force=True, "
            "CLI --force, to unlearn the flagged inputs anyway)")


def _purify(model, loader, clean, detection, cfg, guard, num_labels, pad_id, device, t_total, force=False,
            tokenizer=None, triggers=None):
    report = PurifyReport(config=cfg.to_dict(), world_size=dist.world_size())
    auto = isinstance(triggers, str) and triggers == "auto"
    candidates = check_candidates(triggers) if triggers is not None and not auto else []
    if (candidates or auto) and tokenizer is None:
        raise ValueError("purify(triggers=...) needs the model's tokenizer (tokenizer=...) to insert the candidates "
                         "into the clean rows")

    if detection is None:
        import dupfast
        t0 = time.perf_counter()
        detection = dupfast.detect(model, loader, clean=clean)
        report.timings["detect_s"] = round(time.perf_counter() - t0, 3)

    # ---- read and check everything (nothing written to the model yet) ----------------------------------
    t0 = time.perf_counter()
    pool_rows, row_ids = read_rows(loader, "pool", model)
    match = match_detection(row_ids, detection)
    keep = torch.nonzero(match.flags).flatten().tolist()
    flagged = pool_rows.subset(keep)

    flag_logits = None if match.logits is None else match.logits[keep]
    clean_rows, _ = read_rows(clean, "clean", model, need_labels=True, num_labels=num_labels)
    require_clean_rows(clean_rows)
    if auto and keep and not no_poison_reason(detection, force):
        found, candidates = detect_candidates(model, tokenizer, pool_rows, match.flags.tolist(), clean_rows)
        report.triggers = found
        if not candidates:
            report.warnings.append(NO_CANDIDATE)
    del pool_rows
    n_pool, n_flag, n_clean = (int(v) for v in dist.reduce_numbers([len(row_ids), len(flagged), len(clean_rows)]))
    report.data = {"pool": n_pool, "flagged": n_flag, "clean": n_clean, "num_labels": num_labels}
    report.timings["collect_s"] = round(time.perf_counter() - t0, 3)
    require_clean_size(n_clean, cfg.holdout_fraction)
    probe(model, clean_rows, pad_id, device, num_labels)

    no_poison = no_poison_reason(detection, force)
    if n_flag == 0 or no_poison:
        msg = no_poison or "the detection flagged no input of the pool: nothing to unlearn, the model is returned unchanged"
        warnings.warn(msg, UserWarning, stacklevel=3)
        report.warnings.append(msg)
        report.stop_reason = "no evidence of poison" if no_poison else "no flagged inputs"
        report.timings["total_s"] = round(time.perf_counter() - t_total, 3)
        guard.restore()  # unchanged, modes included (the detection and probe passes ran in eval mode)
        return model, report

    warn_flag_share(n_flag, n_pool, report, stacklevel=3)  # unlearning goes ahead: say when it takes nearly all
    f_train, f_hold = split_holdout(flagged, cfg.holdout_fraction)
    c_train, c_hold = split_holdout(clean_rows, cfg.holdout_fraction)
    counts = [int(v) for v in dist.reduce_numbers([len(f_train), len(f_hold), len(c_train), len(c_hold)])]
    report.data.update(flagged_train=counts[0], flagged_holdout=counts[1], clean_train=counts[2],
                       clean_holdout=counts[3])
    if counts[1] == 0 or counts[3] == 0:
        # too few rows to hold any out: the stopping rule then reads the training rows themselves
        msg = (f"held-out sets are empty (flagged {counts[1]}, clean {counts[3]}): the stopping rule uses the "
               "training rows")
        if cfg.holdout_fraction > 0:
            warnings.warn(msg, UserWarning, stacklevel=3)
        report.warnings.append(msg)
        f_hold, c_hold = list(range(len(flagged))), list(range(len(clean_rows)))
    report.data["eval_rows"] = "holdout" if counts[1] and counts[3] else "train"

    # ---- the teacher: the model as given, eval mode ---------------------------------------------------
    t0 = time.perf_counter()
    flag_train, flag_hold, clean_train = flagged.subset(f_train), flagged.subset(f_hold), clean_rows.subset(c_train)
    if flag_logits is not None:
        report.teacher_logits = check_detection_logits(model, flagged, flag_logits, pad_id, device)
        t_train, t_hold = flag_logits[f_train], flag_logits[f_hold]
    else:
        t_train, t_hold = (teacher_logits(model, r, pad_id, device) for r in (flag_train, flag_hold))
        report.teacher_logits = {"source": "computed"}
    t_clean = teacher_logits(model, clean_train, pad_id, device) if cfg.lambda_keep > 0 else None
    if candidates:
        clean_train, t_clean = with_invariance(model, clean_train, t_clean, candidates, tokenizer, cfg, report)
        if cfg.invariance_kl_cap is not None:
            cfg = cfg.replace(kl_cap=cfg.invariance_kl_cap)
            report.config = cfg.to_dict()
    data = TrainData(flag_train, flag_hold, clean_train, clean_rows.subset(c_hold), t_train, t_hold, t_clean)
    check_teacher_logits({"flagged training": data.teacher_flag_train, "flagged held out": data.teacher_flag_hold,
                          "clean training": data.teacher_clean_train})
    report.timings["teacher_s"] = round(time.perf_counter() - t0, 3)

    # ---- adapters, training, merge ---------------------------------------------------------------------
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        student, family, targets = attach_student(model, cfg)
        report.model = {"family": family, "target_modules": targets,
                        "trainable_params": sum(p.numel() for _, p in trainable_parameters(student)),
                        "total_params": sum(p.numel() for p in student.parameters()), "lora": cfg.use_lora}
        torch.manual_seed(cfg.seed + dist.rank())  # dropout differs across ranks, as with separate batches
        train(student, data, cfg, pad_id, device, report)

    t0 = time.perf_counter()
    check = data.flag_hold if len(data.flag_hold) else data.clean_hold
    check = check.subset(range(min(len(check), 64)))
    before = predict_rows(student, check, pad_id, device) if len(check) else None
    if cfg.use_lora:
        guard.keep_modules(targets)  # merge_and_unload writes into the adapted layers' weights
    purified = merge(student)
    purified.eval()
    check_student_logits(purified, data, pad_id, device)  # raises inside the guard: the model is restored
    if before is not None:
        after = predict_rows(purified, check, pad_id, device)
        report.merge_check = {"rows": len(check), "max_abs_logit_diff": float((after - before).abs().max()),
                              "argmax_equal": bool((after.argmax(-1) == before.argmax(-1)).all())}
    report.timings["merge_s"] = round(time.perf_counter() - t0, 3)
    report.timings["total_s"] = round(time.perf_counter() - t_total, 3)
    return purified, report


def with_invariance(model, clean_train, t_clean, candidates, tokenizer, cfg, report):
    """The clean training rows followed by their triggered copies (invariance.py), and the teacher's logits for
    both: a copy's target is the teacher on its clean source row, not on the copy (which carries the trigger)."""
    longest = max(len(r) for r in clean_train.ids)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or longest + 32
    copies = invariance_rows(clean_train, candidates, tokenizer, cfg.seed, min(longest + 32, limit))
    check_rows(copies, model, "the trigger-invariance rows")
    report.data.update(invariance_rows=len(copies), trigger_candidates=list(candidates))
    teacher = None if t_clean is None else torch.cat([t_clean, t_clean])  # copy i comes from clean row i
    return concat(clean_train, copies), teacher


def _config(config, overrides) -> PurifyConfig:
    if config is not None and not isinstance(config, PurifyConfig):
        raise TypeError(f"config must be a PurifyConfig, got {type(config).__name__}")
    cfg = config or PurifyConfig()
    return cfg.replace(**overrides) if overrides else cfg


def _check_model(model, cfg):
    """(num_labels, pad id, device) of a model purify can work on; raises before any work otherwise."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a HF sequence classifier), got {type(model).__name__}")
    check_classifier(model, "purify")  # the same check as detection's: an AutoModel / CausalLM is named
    n = model_num_labels(model)
    if n is None or n < 2:
        raise ValueError("purify needs a sequence classifier whose config.num_labels >= 2 "
                         f"(got {n!r}); e.g. AutoModelForSequenceClassification")
    if hasattr(model, "peft_config") or any(hasattr(m, "lora_A") or hasattr(m, "modules_to_save")
                                            for m in model.modules()):
        raise ValueError(f"the model ({type(model).__name__}) already carries peft adapters or wrappers: merge them "
                         "(model.merge_and_unload()) or pass the plain model")
    if cfg.use_lora:
        find_target_modules(model, cfg.target_modules)  # fail on an unsupported model before any work
    # a decoder's head finds the last token by config.pad_token_id: None is an error here (rows are padded
    # with it), not transformers' "Cannot handle batch sizes > 1" halfway through
    check_pad_token(model)
    pid = getattr(getattr(model, "config", None), "pad_token_id", None)
    return n, int(pid) if pid is not None else 0, model_device(model)

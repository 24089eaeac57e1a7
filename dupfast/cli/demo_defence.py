"""The demo's defence steps: detect the poisoned inputs of a suspicious pool, then purify the victim.

The defender holds a small clean labelled set and an unlabelled pool (clean + triggered inputs); the
ground-truth poison labels are used only to score the detector and the purified model afterwards.
"""
import time

from ..harness.data import split_samples


def _pool_and_clean(state):
    """Disjoint halves of the clean dev split: one is the defender's clean set, the other joins the
    triggered dev inputs in the pool."""
    d, s = state.data, state.settings
    half = len(d.dev_clean) // 2
    clean, pool_clean = split_samples(d.dev_clean, [half, len(d.dev_clean) - half], seed=s.seed)
    return clean, pool_clean + list(d.dev_poison)


def detect_step(state) -> dict:
    from ..harness import metrics
    from ..detection import detect_texts

    clean, pool = _pool_and_clean(state)
    t0 = time.perf_counter()
    result = detect_texts(state.model, state.tokenizer, [x.text for x in pool],
                          clean_texts=[x.text for x in clean], clean_labels=[x.label for x in clean],
                          max_len=state.settings.max_len)
    seconds = round(time.perf_counter() - t0, 1)
    state.pool, state.clean, state.detection = pool, clean, result
    truth = [x.poison_label for x in pool]
    rep = metrics.detection_report(truth, result.flags, result.scores)
    return {"clean_size": len(clean), "pool_size": len(pool), "pool_poisoned": sum(truth),
            "flagged": int(result.flags.sum()), "threshold": float(result.threshold),
            "detect_seconds": seconds, "poison_present": result.poison_present, "p_value": result.p_value,
            "verdict": result.summary, **{k: rep[k] for k in ("auroc", "frr", "far", "precision", "recall", "f1")}}


def purify_step(state) -> dict:
    from .. import purify
    from ..detection import text_loader
    from ..harness.victims import evaluate_backdoor

    s = state.settings
    pool_loader = list(text_loader(state.tokenizer, [x.text for x in state.pool], None, 32, s.max_len))
    clean_loader = list(text_loader(state.tokenizer, [x.text for x in state.clean],
                                    [x.label for x in state.clean], 32, s.max_len))
    t0 = time.perf_counter()
    # peft's own FutureWarning is silenced where peft is called (purification/lora.py)
    state.model, report = purify(state.model, pool_loader, clean=clean_loader, detection=state.detection,
                                 **{"progress": state.progress, **state.purify_overrides})
    seconds = round(time.perf_counter() - t0, 1)
    after = evaluate_backdoor(state.model, state.tokenizer, state.data.test_clean, state.data.test_poison,
                              s.target, max_len=s.max_len)
    return {"overrides": state.purify_overrides, "purify_seconds": seconds, "cacc_after": after["cacc"],
            "asr_after": after["asr"], "asr_floor_after": after["asr_floor"], "stop_reason": report.stop_reason,
            "steps_run": report.steps_run, "flagged_rows": report.data, "selected": report.selected,
            "teacher": report.teacher, "history": report.history,
            "config": {k: report.config.get(k) for k in ("agree_bound", "acc_tolerance", "patience", "max_steps")}}

"""Detection-guided unlearning for causal LMs.

    purified, report = dupfast.purify_generative(model, pool_batches, clean=clean_batches, detection=result)

The sibling of `dupfast.purify` for generative models (same transaction, LoRA attach, stopping rule, report):

1. read and check everything first: the pool's prompts, the clean prompt + response rows (responses required),
   the detection matched to the pool by id, every row within the model's context (a flagged prompt + the
   generation budget `max_new_tokens`);
2. inside `ModelGuard` (any failure restores the caller's model exactly): the TEACHER'S RESPONSE to each flagged
   prompt, generated greedily by the model as given (the backdoored behaviour to unlearn: the positions the
   ascent runs on); LoRA adapters on the attention projections; the teacher = the model with the adapters
   disabled, cached once as its final hidden states at every response position (flagged rows, and clean rows for
   the keep term): [R, H], not [R, V] logits — the frozen head turns them into logits inside `vocab_kl`;
3. training: per step one batch of flagged rows + one of clean rows, one decoder forward, the objective of
   objective.py (ascent on KL(p_T‖p_S) over the vocabulary at every response position of the flagged rows, keep
   KL + CE on the clean responses), clip, AdamW, linear schedule;
4. stopping / selection (purification.stopping.StoppingRule) from held-out rows only: `agree` = the share of
   held-out flagged prompts on which the student, teacher-forced on the teacher's response, still predicts every
   token of it (= its greedy generation would still be the teacher's response); a state is admissible while the
   held-out clean exact-match rate (greedy would reproduce the reference response) stays within `acc_tolerance`
   of the teacher's and the held-out clean CE within `clean_loss_tolerance` (relative) of it;
5. the kept state merged (merge_and_unload), the model returned in eval mode with the report.
"""
import dataclasses
import math
import random
import time
import warnings
from typing import Optional

import torch

from ..classifier import check_weights_loaded
from ..purification.checks import require_reiterable, warn_flag_share
from ..purification.api import no_poison_reason
from ..purification.guard import ModelGuard
from ..purification.invariance import NO_CANDIDATE
from ..purification.lora import attach_student, find_target_modules, merge, teacher_context, trainable_parameters
from ..purification.report import PurifyReport
from ..purification.rows import match_detection, row_hash
from ..purification.stopping import StoppingRule
from .config import GenerativeConfig
from .invariance import find_candidates, requested_triggers, triggered_copies, user_turns
from .lm import check_causal_lm, final_hidden
from .objective import generative_loss
from .rows import ChatRows, check_context, pad_right, read_chat

EVAL_BATCH = 16
GEN_BATCH = 16


def purify_generative(model, loader, clean=None, detection=None, config: GenerativeConfig = None,
                      force: bool = False, tokenizer=None, triggers=None, **overrides):
    """Purify the causal LM `model` in place; returns (model, PurifyReport). loader: the suspicious pool's prompt
    batches; clean: the defender's clean prompt + response batches (dupfast.generative.chat_batches); detection: a
    `detect_prompts` result over the pool (matched by index) or a bool [N] vector; None runs detect_prompts first.
    force: unlearn even when the detection's verdict is "no evidence of poison" (else the model is returned
    unchanged, the report saying why). Raises before touching the model on bad input; restores it exactly on any
    later failure.
    triggers: trigger candidates (words or short phrases, or `dupfast.triggers` results; needs `tokenizer`, the one
    the batches were built with): each clean training prompt gets a copy with one of them inserted into its user
    text, trained toward the teacher's response distribution on the clean prompt and the clean response, so the
    purified model forgets the trigger instead of inverting it (invariance.py); the ascent is then capped at
    `invariance_kl_cap`. "auto": the candidates `dupfast.triggers` finds in the pool's user texts (flagged vs kept
    prompts; flip rate: the teacher's first response token), chosen by `purification.invariance.insertable` and
    listed in report.triggers. None: no copies."""
    t_total = time.perf_counter()
    request = requested_triggers(triggers, tokenizer)  # bad candidates fail before any work
    if config is not None and not isinstance(config, GenerativeConfig):
        raise TypeError(f"config must be a GenerativeConfig, got {type(config).__name__}")
    cfg = (config or GenerativeConfig())
    cfg = cfg.replace(**overrides) if overrides else cfg
    check_weights_loaded(model, "purify_generative")  # meta-device weights: named here, not a raw torch error
    lm = check_causal_lm(model, "purify_generative")
    if clean is None:
        raise ValueError("purify_generative needs clean prompt + response batches (clean=...): their keep and CE "
                         "terms protect clean behaviour and their held-out part drives the stopping rule")
    if cfg.use_lora:
        find_target_modules(model, cfg.target_modules)
    report = PurifyReport(config=cfg.to_dict())

    if detection is None:
        require_reiterable("purify_generative", pool=loader, clean=clean)  # read by the detection, then again
        from .detect import detect_prompts
        t0 = time.perf_counter()
        detection = detect_prompts(model, loader, clean=clean)
        report.timings["detect_s"] = round(time.perf_counter() - t0, 3)

    # ---- read and check everything (the model is not touched) -------------------------------------------
    pool = read_chat(loader, "pool", lm, need_responses=False, extra_tokens=cfg.max_new_tokens)
    match = match_detection(pool.index, detection)
    flagged = pool.subset(torch.nonzero(match.flags).flatten().tolist())
    clean_rows = read_chat(clean, "clean", lm, need_responses=True)
    report.data = {"pool": len(pool), "flagged": len(flagged), "clean": len(clean_rows)}
    plan = plan_invariance(request, tokenizer, pool, clean_rows, lm, cfg.seed)

    with ModelGuard(model, copy_weights=not cfg.use_lora) as guard:
        no_poison = no_poison_reason(detection, force)
        if len(flagged) == 0 or no_poison:
            msg = no_poison or ("the detection flagged no prompt of the pool: nothing to unlearn, the model is "
                                "returned unchanged")
            warnings.warn(msg, UserWarning, stacklevel=2)
            report.warnings.append(msg)
            report.stop_reason = "no evidence of poison" if no_poison else "no flagged inputs"
            guard.restore()
            return model, report
        warn_flag_share(len(flagged), len(pool), report, "prompts", stacklevel=2)  # unlearning goes ahead
        if plan is not None and plan.auto:
            auto_candidates(plan, lm, tokenizer, match.flags.tolist(), clean_rows, cfg.seed, report)
        return _purify(lm, flagged, clean_rows, cfg, guard, report, t_total, plan)


def _purify(lm, flagged, clean_rows, cfg, guard, report, t_total, plan=None):
    model = lm.model
    t0 = time.perf_counter()
    flagged = teacher_responses(lm, flagged, cfg.max_new_tokens)
    report.timings["generate_s"] = round(time.perf_counter() - t0, 3)
    f_train, f_hold = split_holdout(flagged, cfg.holdout_fraction)
    c_train, c_hold = split_holdout(clean_rows, cfg.holdout_fraction)
    if not f_hold or not c_hold:
        msg = f"held-out sets are empty (flagged {len(f_hold)}, clean {len(c_hold)}): the stopping rule uses the training rows"
        if cfg.holdout_fraction > 0:
            warnings.warn(msg, UserWarning, stacklevel=3)
        report.warnings.append(msg)
        f_hold, c_hold = list(range(len(flagged))), list(range(len(clean_rows)))
    data = {"flag_train": flagged.subset(f_train), "flag_hold": flagged.subset(f_hold),
            "clean_train": clean_rows.subset(c_train), "clean_hold": clean_rows.subset(c_hold)}
    report.data.update({k: len(v) for k, v in data.items()},
                       response_positions_flagged=sum(len(r) for r in flagged.responses))

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        student, family, targets = attach_student(model, cfg)
        if not cfg.use_lora:
            lm.head.weight.requires_grad_(False)
        report.model = {"family": family, "target_modules": targets, "lora": cfg.use_lora,
                        "trainable_params": sum(p.numel() for _, p in trainable_parameters(student)),
                        "total_params": sum(p.numel() for p in student.parameters()), "vocab_size": lm.vocab_size}
        t0 = time.perf_counter()
        with teacher_context(student):
            teacher = {k: teacher_hidden(lm, data[k]) for k in ("flag_train", "clean_train") if len(data[k])}
            base = evaluate(lm, data, None)
        report.timings["teacher_s"] = round(time.perf_counter() - t0, 3)
        if plan is not None and plan.copies is not None and c_train:
            cfg = with_copies(data, teacher, plan, c_train, cfg, report)
        report.teacher = {"heldout_flag_agreement": 1.0, "heldout_clean_match": base["match"],
                          "heldout_clean_loss": base["loss"]}
        torch.manual_seed(cfg.seed + 1)
        train(lm, student, data, teacher, base, cfg, report)

    t0 = time.perf_counter()
    probe = data["flag_hold"].subset(range(min(8, len(data["flag_hold"]))))
    before = _probe_hidden(lm, probe)
    if cfg.use_lora:
        guard.keep_modules(targets)
    purified = merge(student)
    purified.eval()
    lm = dataclasses.replace(lm, model=purified, decoder=purified.get_decoder())
    after = _probe_hidden(lm, probe)
    report.merge_check = {"rows": len(probe), "max_abs_hidden_diff": float((after - before).abs().max())}
    report.timings["merge_s"] = round(time.perf_counter() - t0, 3)
    report.timings["total_s"] = round(time.perf_counter() - t_total, 3)
    return purified, report


# ---- trigger invariance --------------------------------------------------------------------------------------

@dataclasses.dataclass
class InvariancePlan:
    """What triggers= asked for, read before the model is touched: the candidates ("auto": found later, inside the
    guard), the clean prompts' texts, and one triggered copy per clean row (subset to the training rows later)."""
    auto: bool
    candidates: list
    clean_turns: list
    pool_turns: Optional[list] = None
    copies: Optional[ChatRows] = None


def plan_invariance(request, tokenizer, pool, clean_rows, lm, seed) -> Optional[InvariancePlan]:
    """Read the prompts' user texts (and, for given candidates, build and check the copies) before any model work:
    a prompt of another template, or a copy longer than the context, fails here."""
    if request is None:
        return None
    auto = request == "auto"
    plan = InvariancePlan(auto, [] if auto else list(request), user_turns(tokenizer, clean_rows, "clean"),
                          user_turns(tokenizer, pool, "pool") if auto else None)
    if not auto:
        plan.copies = copies_of(tokenizer, clean_rows, plan, lm, seed)
    return plan


def copies_of(tokenizer, clean_rows, plan, lm, seed) -> ChatRows:
    copies = triggered_copies(tokenizer, clean_rows, plan.clean_turns, plan.candidates, seed)
    check_context(copies, lm, "trigger-invariance copy")
    return copies


def auto_candidates(plan, lm, tokenizer, flags, clean_rows, seed, report):
    """triggers="auto": dupfast.triggers on the pool's user texts (the teacher's flip rates), the copies of the
    insertable candidates; none found (or only common words): the report says so and no copy is made."""
    t0 = time.perf_counter()
    found, plan.candidates, signal = find_candidates(lm, tokenizer, plan.pool_turns, flags, plan.clean_turns)
    report.timings["triggers_s"] = round(time.perf_counter() - t0, 3)
    report.triggers = found
    report.data["trigger_flip_rate"] = signal
    if plan.candidates:
        plan.copies = copies_of(tokenizer, clean_rows, plan, lm, seed)
        return
    report.warnings.append(NO_CANDIDATE)
    report.data.update(invariance_rows=0, trigger_candidates=[])


def with_copies(data, teacher, plan, c_train, cfg, report):
    """The clean training rows followed by their triggered copies, the teacher's hidden states on the clean SOURCE
    prompts as the copies' keep targets (copy j comes from clean training row j: same response positions), and the
    ascent's cap lowered to invariance_kl_cap (the copies say what to learn; the ascent only has to leave the
    teacher a little). Returns the config training runs with."""
    copies = plan.copies.subset(c_train)
    data["clean_train"] = data["clean_train"].concat(copies)
    if "clean_train" in teacher:
        teacher["clean_train"] = teacher["clean_train"] + teacher["clean_train"]
    report.data.update(invariance_rows=len(copies), trigger_candidates=list(plan.candidates))
    if cfg.invariance_kl_cap is not None:
        cfg = cfg.replace(kl_cap=cfg.invariance_kl_cap)
        report.config = cfg.to_dict()
    return cfg


# ---- the teacher ---------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_responses(lm, rows: ChatRows, max_new_tokens: int) -> ChatRows:
    """The model's greedy response to each prompt (cut after the first end-of-turn token, which it keeps)."""
    model = lm.model
    was = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(rows), GEN_BATCH):
            prompts = rows.prompts[lo:lo + GEN_BATCH]
            T = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), T), lm.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding: generation continues every row at the end
                ids[i, T - len(p):] = torch.as_tensor(p)
                mask[i, T - len(p):] = 1
            gen = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.pad_id,
                                 eos_token_id=list(lm.eos_ids) or None)[:, T:].cpu().tolist()
            for g in gen:
                cut = next((j for j, t in enumerate(g) if t in lm.eos_ids), None)
                out.append(g[:cut + 1] if cut is not None else g)
    finally:
        model.train(was)
    return ChatRows(rows.prompts, out, rows.index, rows.labels)


def split_holdout(rows: ChatRows, fraction: float):
    """(train, held-out) positions by the hash of the prompt's tokens: identical prompts land on the same side."""
    held = [i for i, p in enumerate(rows.prompts) if row_hash(p) < fraction]
    s = set(held)
    return [i for i in range(len(rows)) if i not in s], held


def batch_positions(lm, rows: ChatRows, idx):
    """Right-padded prompt + response of rows `idx`: (ids, mask, (batch rows, positions) of the response
    predictions, next tokens). Position t predicts token t + 1: the response's tokens are predicted from the
    positions len(prompt) - 1 ... len(prompt) + len(response) - 2."""
    seqs = [rows.prompts[i] + rows.responses[i] for i in idx]
    ids, mask = pad_right(seqs, lm.pad_id, lm.device)
    b_idx, pos, tgt = [], [], []
    for b, i in enumerate(idx):
        p, r = len(rows.prompts[i]), rows.responses[i]
        b_idx += [b] * len(r)
        pos += range(p - 1, p + len(r) - 1)
        tgt += r
    dev = lm.device
    return ids, mask, (torch.tensor(b_idx, device=dev), torch.tensor(pos, device=dev)), torch.tensor(tgt, device=dev)


def response_hidden(lm, rows: ChatRows, idx):
    ids, mask, where, tgt = batch_positions(lm, rows, idx)
    last, _ = final_hidden(lm, ids, mask)
    return last[where], tgt


@torch.no_grad()
def teacher_hidden(lm, rows: ChatRows) -> list:
    """Per row, the final hidden states [len(response), H] (CPU) at its response positions."""
    out = []
    was = lm.model.training
    lm.model.eval()
    try:
        for lo in range(0, len(rows), EVAL_BATCH):
            idx = list(range(lo, min(lo + EVAL_BATCH, len(rows))))
            h, _ = response_hidden(lm, rows, idx)
            h = h.float().cpu()
            sizes = [len(rows.responses[i]) for i in idx]
            out += list(torch.split(h, sizes))
    finally:
        lm.model.train(was)
    return out


@torch.no_grad()
def _probe_hidden(lm, rows):
    if not len(rows):
        return torch.zeros(0)
    return torch.cat(teacher_hidden(lm, rows))


# ---- evaluation ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(lm, data, _unused=None) -> dict:
    """Eval mode, teacher forcing. agree: share of held-out flagged rows whose every response token is the argmax
    (the greedy generation would still be the teacher's response); token_agree: per position; match: the same on
    the held-out clean rows against the reference responses; loss: their mean CE per response token."""
    was = lm.model.training
    lm.model.eval()
    res = {}
    try:
        for key, name in (("flag_hold", "agree"), ("clean_hold", "match")):
            rows = data[key]
            seq_ok = tok_ok = n_tok = 0
            ce = 0.0
            for lo in range(0, len(rows), EVAL_BATCH):
                idx = list(range(lo, min(lo + EVAL_BATCH, len(rows))))
                h, tgt = response_hidden(lm, rows, idx)
                logits = h.float() @ lm.weight.float().T
                ok = logits.argmax(-1) == tgt
                ce += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
                tok_ok += int(ok.sum())
                n_tok += ok.numel()
                for part in torch.split(ok, [len(rows.responses[i]) for i in idx]):
                    seq_ok += int(part.all())
            res[name] = seq_ok / len(rows) if len(rows) else float("nan")
            res[f"{name}_tokens"] = tok_ok / n_tok if n_tok else float("nan")
            if key == "clean_hold":
                res["loss"] = ce / n_tok if n_tok else float("nan")
    finally:
        lm.model.train(was)
    return res


# ---- training ------------------------------------------------------------------------------------------------

class _Cycle:
    def __init__(self, n, bs, seed):
        self.n, self.bs, self.rng, self.queue = n, bs, random.Random(seed), []

    def next(self):
        if self.n == 0:
            return []
        if len(self.queue) < self.bs:
            order = list(range(self.n))
            self.rng.shuffle(order)
            self.queue += order
        out, self.queue = self.queue[:self.bs], self.queue[self.bs:]
        return out


def train(lm, student, data, teacher, base, cfg, report):
    from transformers import get_linear_schedule_with_warmup

    t_start = time.perf_counter()
    ft, ct = data["flag_train"], data["clean_train"]
    if len(ft) == 0 and len(ct) == 0:
        raise ValueError("no training rows (flagged and clean training sets are both empty)")
    steps_per_epoch = max(1, math.ceil((len(ft) or len(ct)) / cfg.batch_size))
    total = cfg.max_steps or max(cfg.epochs * steps_per_epoch, cfg.min_steps)
    round_steps = steps_per_epoch if cfg.max_steps else total / cfg.epochs
    eval_every = max(1, math.ceil(round_steps / cfg.evals_per_epoch))
    patience = None if cfg.patience is None else max(1, math.ceil(cfg.patience * round_steps / eval_every))
    named = trainable_parameters(student)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    rule = StoppingRule(1.0, base["match"], cfg.agree_bound, cfg.acc_tolerance, patience)
    rule.best.update(agree_tokens=1.0, clean_match=base["match"], clean_loss=base["loss"])
    best = [p.detach().clone() for p in params]
    for (name, _), b in zip(named, best):
        if "lora_B" in name:
            b.zero_()  # the step-0 fallback is the model as given
    loss_limit = base["loss"] * (1 + cfg.clean_loss_tolerance)
    history, stop_reason, n = [dict(rule.best)], f"step budget exhausted ({total} steps)", 0
    fc, cc = _Cycle(len(ft), cfg.batch_size, cfg.seed), _Cycle(len(ct), cfg.batch_size, cfg.seed + 1)
    sums = {"loss": 0.0, "ascent": 0.0, "kl": 0.0, "keep_kl": 0.0, "ce": 0.0, "active": 0, "flagged": 0, "n": 0}
    weight = lm.weight
    student.train(cfg.dropout)
    for n in range(1, total + 1):
        f_idx = fc.next() if cfg.lambda_asr > 0 else []
        c_idx = cc.next() if (cfg.lambda_acc > 0 or cfg.lambda_keep > 0) else []
        h_f = h_c = tgt_c = t_f = t_c = None
        if f_idx and c_idx:  # one forward over both
            both = ChatRows(ft.prompts + ct.prompts, ft.responses + ct.responses, torch.cat([ft.index, ct.index]))
            idx = f_idx + [len(ft) + i for i in c_idx]
            h, tgt = response_hidden(lm, both, idx)
            n_f = sum(len(ft.responses[i]) for i in f_idx)
            h_f, h_c, tgt_c = h[:n_f], h[n_f:], tgt[n_f:]
        elif f_idx:
            h_f, _ = response_hidden(lm, ft, f_idx)
        else:
            h_c, tgt_c = response_hidden(lm, ct, c_idx)
        if f_idx:
            t_f = torch.cat([teacher["flag_train"][i] for i in f_idx]).to(lm.device)
        if c_idx and cfg.lambda_keep > 0:
            t_c = torch.cat([teacher["clean_train"][i] for i in c_idx]).to(lm.device)
        sl = generative_loss(h_f, t_f, h_c, tgt_c, t_c, weight, cfg)
        opt.zero_grad(set_to_none=True)
        sl.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        for k, v in (("loss", float(sl.loss.detach())), ("ascent", sl.ascent), ("kl", sl.kl_mean), ("keep_kl", sl.keep_kl),
                     ("ce", sl.ce), ("active", sl.active), ("flagged", sl.flagged), ("n", 1)):
            sums[k] += v
        if n % eval_every and n != total:
            continue
        ev = evaluate(lm, data)
        student.train(cfg.dropout)
        m = max(sums["n"], 1)
        entry = {"step": n, "agree": ev["agree"], "agree_tokens": ev["agree_tokens"], "clean_match": ev["match"],
                 "clean_loss": ev["loss"], "loss": sums["loss"] / m, "ascent": sums["ascent"] / m,
                 "train_kl": sums["kl"] / m, "keep_kl": sums["keep_kl"] / m, "ce": sums["ce"] / m,
                 "active_fraction": sums["active"] / max(sums["flagged"], 1), "lr": sched.get_last_lr()[0],
                 # the rule's accuracy: the clean exact-match rate, void once the clean CE left its tolerance
                 "acc": ev["match"] if ev["loss"] <= loss_limit else -1.0}
        sums = dict.fromkeys(sums, 0)
        improved, reason = rule.update(entry)
        history.append(entry)
        if improved and cfg.select_best:
            best = [p.detach().clone() for p in params]
        if reason is not None and cfg.early_stop:
            stop_reason = reason
            break
    if cfg.select_best:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        report.selected = dict(rule.best)
    else:
        report.selected = dict(history[-1])
    student.eval()
    report.history, report.stop_reason, report.steps_run = history, stop_reason, n
    report.data.update(steps_per_epoch=steps_per_epoch, step_budget=total, eval_every=eval_every)
    report.timings["train_s"] = round(time.perf_counter() - t_start, 3)

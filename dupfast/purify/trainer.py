"""The unlearning loop: AdamW + linear warm-up/decay, gradient clipping, periodic held-out evaluation,
stopping and selection from what a defender holds, DistributedDataParallel when torch.distributed is up.

Stopping and selection: stopping.StoppingRule (held-out flagged agreement, held-out clean accuracy).
"""
import dataclasses
import math
import os
import time

import torch

from .. import distributed as dist
from .lora import teacher_context, trainable_parameters
from .objective import ascent_targets, unlearning_loss
from .rows import concat_inputs, index_batches, pad
from .stopping import StoppingRule

EVAL_BATCH = 64


def forward_logits(model, inputs):
    out = model(**inputs)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    return logits.float()


@torch.no_grad()
def predict_rows(model, rows, pad_id, device, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Eval-mode logits [n, C] (CPU) of every row, in order."""
    was_training = model.training
    model.eval()
    outs = []
    try:
        for idx in index_batches(len(rows), batch_size, False, 0):
            outs.append(forward_logits(model, pad(rows, idx, pad_id, device)).cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


def cache_teacher(model, row_sets, pad_id, device):
    """Teacher logits of each row set, computed once with the adapters disabled."""
    with teacher_context(model):
        return [predict_rows(model, rows, pad_id, device) for rows in row_sets]


def held_out_metrics(model, flag_rows, flag_teacher, clean_rows, pad_id, device):
    """Global (all ranks) agreement with the teacher on flagged rows and accuracy on clean rows."""
    agree = n_flag = correct = n_clean = 0
    if len(flag_rows):
        s = predict_rows(model, flag_rows, pad_id, device)
        agree, n_flag = int((s.argmax(-1) == flag_teacher.argmax(-1)).sum()), len(flag_rows)
    if len(clean_rows):
        s = predict_rows(model, clean_rows, pad_id, device)
        correct, n_clean = int((s.argmax(-1) == clean_rows.labels).sum()), len(clean_rows)
    agree, n_flag, correct, n_clean = dist.reduce_numbers([agree, n_flag, correct, n_clean])
    return (agree / n_flag if n_flag else float("nan"), correct / n_clean if n_clean else float("nan"),
            int(n_flag), int(n_clean))


def _progress(total, enabled):
    if not enabled or dist.rank() != 0 or os.environ.get("DUPFAST_QUIET") == "1":
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="purify", leave=False)


def tie_diagnostics(model, flag_in, flag_targets, flag_teacher, clean_in, clean_labels, cfg):
    """Gradient norms at step 0 of the ascent and CE terms, in the training forward mode and in eval mode
    (where student == teacher exactly, so the ascent gradient is exactly zero unless the start breaks the
    tie). Rank-local, on the unwrapped model, before any update."""
    params = [p for _, p in trainable_parameters(model)]
    out = {}
    for mode in ("train", "eval"):
        model.train(mode == "train" and cfg.dropout)
        if flag_in is not None and cfg.lambda_asr > 0:
            s = forward_logits(model, flag_in)
            term = unlearning_loss(s, flag_targets, flag_teacher, None, None, cfg, s.shape[0], 1)
            grads = torch.autograd.grad(term.loss, params, allow_unused=True)
            out[f"ascent_grad_norm_{mode}"] = _norm(grads)
            out[f"kl_mean_{mode}"] = term.kl_mean
        if mode == "train" and clean_in is not None and cfg.lambda_acc > 0:
            s = forward_logits(model, clean_in)
            ce_only = dataclasses.replace(cfg, lambda_keep=0.0)  # the CE term's own gradient
            term = unlearning_loss(None, None, None, s, clean_labels, ce_only, 1, s.shape[0])
            out["ce_grad_norm_train"] = _norm(torch.autograd.grad(term.loss, params, allow_unused=True))
    model.train(cfg.dropout)
    return out


def _norm(grads):
    sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(sq)


class _Cycle:
    """Endless shuffled batches of a row set (reshuffled each pass)."""

    def __init__(self, n, batch_size, seed):
        self.n, self.bs, self.seed, self.pass_no, self.queue = n, batch_size, seed, 0, []

    def next(self):
        if self.n == 0:
            return []
        if not self.queue:
            self.queue = index_batches(self.n, self.bs, True, self.seed + 1000 * self.pass_no)
            self.pass_no += 1
        return self.queue.pop(0)


def train(model, data, cfg, pad_id, device, report):
    """Run the loop on `model` (a peft model, or a plain one for full fine-tuning) in place.

    data: dict with Rows `flag_train`, `flag_hold`, `clean_train`, `clean_hold` (this rank's shard) and
    tensors `teacher_flag_train`, `teacher_flag_hold` (cached teacher logits)."""
    from transformers import get_linear_schedule_with_warmup

    t_start = time.perf_counter()
    world = dist.world_size()
    ft, fh, ct, ch = data["flag_train"], data["flag_hold"], data["clean_train"], data["clean_hold"]
    use_flags = cfg.lambda_asr > 0
    if len(ct) == 0 and (not use_flags or len(ft) == 0):
        raise ValueError("this process has no training rows (clean and flagged training sets are both empty); "
                         "give every process a shard of the clean set")
    n_ft_global, = dist.reduce_numbers([len(ft)])
    local_batches = math.ceil(len(ft) / cfg.batch_size) if len(ft) else math.ceil(len(ct) / cfg.batch_size)
    steps_per_epoch = int(dist.reduce_numbers([local_batches], "max")[0])  # every rank runs the same steps
    total = cfg.max_steps or max(cfg.epochs * steps_per_epoch, cfg.min_steps)
    # a "round" is an epoch, stretched when min_steps raised the budget: evaluations and patience follow it
    round_steps = steps_per_epoch if cfg.max_steps else total / cfg.epochs
    eval_every = max(1, math.ceil(round_steps / cfg.evals_per_epoch))
    flag_targets = ascent_targets(data["teacher_flag_train"], cfg) if len(ft) else None

    named = trainable_parameters(model)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    ddp = dist.wrap_ddp(model, device)

    flag_cycle, clean_cycle = _Cycle(len(ft), cfg.batch_size, cfg.seed), _Cycle(len(ct), cfg.batch_size, cfg.seed + 1)

    # step 0: the teacher's own held-out numbers, and its state (LoRA B = 0, the original head) as the
    # fallback selection, so "nothing better found" returns the input model exactly
    t0 = time.perf_counter()
    with teacher_context(model):
        agree0, acc0, n_fh, n_ch = held_out_metrics(model, fh, data["teacher_flag_hold"], ch, pad_id, device)
    eval_seconds = time.perf_counter() - t0
    report.teacher = {"heldout_clean_acc": acc0, "heldout_flag_agreement": agree0,
                      "heldout_flagged": n_fh, "heldout_clean": n_ch}
    # patience is in epochs; the rule counts evaluations
    patience = None if cfg.patience is None else max(1, math.ceil(cfg.patience * round_steps / eval_every))
    rule = StoppingRule(agree0, acc0, cfg.agree_bound, cfg.acc_tolerance, patience)
    history = [rule.best]
    best_state = None
    if cfg.select_best:
        best_state = _snapshot(params)
        for (name, _), s0 in zip(named, best_state):
            if "lora_B" in name:
                s0.zero_()
    stop_reason = f"step budget exhausted ({total} steps)"
    bar = _progress(total, cfg.progress)
    sums = {"loss": 0.0, "ascent": 0.0, "kl": 0.0, "ce": 0.0, "keep_kl": 0.0, "active": 0, "flagged": 0, "n": 0}
    step = 0
    model.train(cfg.dropout)
    for step in range(1, total + 1):
        f_idx = flag_cycle.next() if use_flags else []
        c_idx = clean_cycle.next() if cfg.lambda_acc > 0 else []
        if step == 1:
            report.tie = tie_diagnostics(model, pad(ft, f_idx, pad_id, device) if f_idx else None,
                                         flag_targets[f_idx].to(device) if f_idx else None,
                                         data["teacher_flag_train"][f_idx].to(device) if f_idx else None,
                                         pad(ct, c_idx, pad_id, device) if c_idx else None,
                                         ct.labels[c_idx].to(device) if c_idx else None, cfg)
        parts = [pad(ft, f_idx, pad_id, device)] if f_idx else []
        if c_idx:
            parts.append(pad(ct, c_idx, pad_id, device))
        inputs = parts[0] if len(parts) == 1 else concat_inputs(parts[0], parts[1], pad_id)
        # the sums are normalised by global row counts x world size, since DDP averages over ranks
        n_f, n_c = dist.reduce_numbers([len(f_idx), len(c_idx)])
        logits = forward_logits(ddp, inputs)
        nf = len(f_idx)
        bl = unlearning_loss(logits[:nf] if nf else None, flag_targets[f_idx].to(device) if nf else None,
                             data["teacher_flag_train"][f_idx].to(device) if nf else None,
                             logits[nf:] if c_idx else None, ct.labels[c_idx].to(device) if c_idx else None,
                             cfg, max(n_f, 1) / world, max(n_c, 1) / world,
                             data["teacher_clean_train"][c_idx].to(device) if c_idx and cfg.lambda_keep > 0 else None)
        if not bl.loss.requires_grad:  # nothing on this rank needs a gradient; keep DDP's reduction in step
            bl.loss = bl.loss + 0.0 * logits.sum()
        opt.zero_grad(set_to_none=True)
        bl.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        for k, v in (("loss", float(bl.loss.detach())), ("ascent", bl.ascent), ("kl", bl.kl_mean * bl.flagged),
                     ("ce", bl.ce), ("keep_kl", bl.keep_kl), ("active", bl.active), ("flagged", bl.flagged), ("n", 1)):
            sums[k] += v
        if bar is not None:
            bar.update(1)
        if step % eval_every and step != total:
            continue
        t0 = time.perf_counter()
        agree, acc, _, _ = held_out_metrics(model, fh, data["teacher_flag_hold"], ch, pad_id, device)
        model.train(cfg.dropout)
        eval_seconds += time.perf_counter() - t0
        # training numbers averaged over ranks too, so every rank logs (and reports) the same history
        sums = dict(zip(sums, dist.reduce_numbers(list(sums.values()))))
        entry = {"step": step, "epoch": round(step / steps_per_epoch, 3), "agree": agree, "acc": acc,
                 "lr": sched.get_last_lr()[0],
                 "loss": sums["loss"] / sums["n"], "ascent": sums["ascent"] / sums["n"],
                 "ce": sums["ce"] / sums["n"], "keep_kl": sums["keep_kl"] / sums["n"], "train_kl": sums["kl"] / max(sums["flagged"], 1),
                 "active_fraction": sums["active"] / max(sums["flagged"], 1)}
        history.append(entry)
        sums = dict.fromkeys(sums, 0)
        if bar is not None:
            bar.set_postfix(agree=f"{agree:.3f}", acc=f"{acc:.3f}")
        improved, reason = rule.update(entry)
        if improved and cfg.select_best:
            best_state = _snapshot(params)
        if cfg.early_stop and reason is not None:
            stop_reason = reason
            break
    if bar is not None:
        bar.close()
    if cfg.select_best:
        _restore(params, best_state)
        report.selected = dict(rule.best)
    else:
        report.selected = dict(history[-1])
    model.eval()
    report.history, report.stop_reason, report.steps_run = history, stop_reason, step
    report.data.update(steps_per_epoch=steps_per_epoch, step_budget=total, eval_every=eval_every, flagged_train_global=int(n_ft_global))
    report.timings.update(train_s=round(time.perf_counter() - t_start, 3), eval_s=round(eval_seconds, 3))
    return report


def _snapshot(params):
    return [p.detach().to("cpu", copy=True) for p in params]


def _restore(params, state):
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s.to(p.device))

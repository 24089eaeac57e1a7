"""The unlearning loop in three parts: `plan` (the step budget and the evaluation schedule), `step` (one
optimisation step: one forward of flagged + clean rows, one fused KL call, CE, clip, AdamW) and `evaluate`
(held-out flagged agreement with the teacher, held-out clean accuracy); `train` runs them, with stopping and
selection (stopping.StoppingRule) from what a defender holds, under DistributedDataParallel when
torch.distributed is up.
"""
import contextlib
import dataclasses
import math
import os
import time
from typing import Optional

import torch

from .. import distributed as dist
from ..batches import Rows
from .lora import teacher_context, trainable_parameters
from .objective import BatchLoss, ascent_targets, unlearning_loss
from .rows import index_batches, pad, pad_pair
from .stopping import StoppingRule

EVAL_BATCH = 64


@dataclasses.dataclass
class TrainData:
    """This rank's rows and the teacher's logits on them (computed once, or taken from the detection)."""
    flag_train: Rows
    flag_hold: Rows
    clean_train: Rows
    clean_hold: Rows
    teacher_flag_train: torch.Tensor            # [len(flag_train), C]
    teacher_flag_hold: torch.Tensor             # [len(flag_hold), C]
    teacher_clean_train: Optional[torch.Tensor]  # [len(clean_train), C] when lambda_keep > 0


def forward_logits(model, inputs, autocast=None):
    """fp32 logits of a forward; autocast="bf16": the forward under bf16 autocast (PurifyConfig.autocast)."""
    device_type = inputs["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        out = model(**inputs)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    return logits.float()


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode, then every module's own training flag back (model.train(True) would also
    switch on submodules the caller had in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def predict_rows(model, rows, pad_id, device, batch_size: int = EVAL_BATCH, autocast=None) -> torch.Tensor:
    """Eval-mode logits [n, C] (CPU) of every row, in order."""
    outs = []
    with eval_mode(model):
        for idx in index_batches(len(rows), batch_size, False, 0):
            outs.append(forward_logits(model, pad(rows, idx, pad_id, device), autocast).cpu())
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


# ---- plan -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    steps_per_epoch: int   # batches of flagged training rows (clean ones without ascent), max over ranks
    total: int             # the step budget
    round_steps: float     # an "epoch" of evaluations and patience, stretched when min_steps raised the budget
    eval_every: int
    patience: Optional[int]  # in evaluations
    flagged_train_global: int


def plan(cfg, n_flag_train: int, n_clean_train: int) -> Plan:
    use_flags = cfg.lambda_asr > 0
    if n_clean_train == 0 and (not use_flags or n_flag_train == 0):
        raise ValueError("this process has no training rows (clean and flagged training sets are both empty); "
                         "give every process a shard of the clean set")
    n_ft_global, = dist.reduce_numbers([n_flag_train])
    local = math.ceil((n_flag_train if n_flag_train else n_clean_train) / cfg.batch_size)
    steps_per_epoch = int(dist.reduce_numbers([local], "max")[0])  # every rank runs the same steps
    total = cfg.max_steps or max(cfg.epochs * steps_per_epoch, cfg.min_steps)
    round_steps = steps_per_epoch if cfg.max_steps else total / cfg.epochs
    eval_every = max(1, math.ceil(round_steps / cfg.evals_per_epoch))
    # patience is in epochs; the rule counts evaluations
    patience = None if cfg.patience is None else max(1, math.ceil(cfg.patience * round_steps / eval_every))
    return Plan(steps_per_epoch, total, round_steps, eval_every, patience, int(n_ft_global))


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


# ---- step -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    """One step's rows: positions into the flagged / clean training rows, their inputs on the device."""
    f_idx: list
    c_idx: list
    inputs: dict
    flag_targets: Optional[torch.Tensor]
    flag_teacher: Optional[torch.Tensor]
    clean_labels: Optional[torch.Tensor]
    clean_teacher: Optional[torch.Tensor]


def make_batch(data: TrainData, targets, f_idx, c_idx, cfg, pad_id, device) -> Batch:
    on = lambda t, idx: t[idx].to(device) if idx and t is not None else None  # noqa: E731
    return Batch(f_idx, c_idx, pad_pair(data.flag_train, f_idx, data.clean_train, c_idx, pad_id, device),
                 on(targets, f_idx), on(data.teacher_flag_train, f_idx), on(data.clean_train.labels, c_idx),
                 on(data.teacher_clean_train, c_idx) if cfg.lambda_keep > 0 else None)


def optimizer(params, cfg, total: int):
    """(AdamW over `params`, its linear warm-up / decay schedule over `total` steps): what `step` steps with."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)


def step(ddp, opt, sched, params, batch: Batch, cfg) -> BatchLoss:
    """One optimisation step. The loss sums are normalised by the global row counts / world size, since DDP
    averages gradients over ranks."""
    world = dist.world_size()
    n_f, n_c = dist.reduce_numbers([len(batch.f_idx), len(batch.c_idx)])
    logits = forward_logits(ddp, batch.inputs, cfg.autocast)
    nf = len(batch.f_idx)
    bl = unlearning_loss(logits[:nf] if nf else None, batch.flag_targets, batch.flag_teacher,
                         logits[nf:] if batch.c_idx else None, batch.clean_labels, cfg,
                         max(n_f, 1) / world, max(n_c, 1) / world, batch.clean_teacher)
    if not bl.loss.requires_grad:  # nothing on this rank needs a gradient; keep DDP's reduction in step
        bl.loss = bl.loss + 0.0 * logits.sum()
    opt.zero_grad(set_to_none=True)
    bl.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    return bl


def tie_diagnostics(model, data: TrainData, batch: Batch, cfg, pad_id, device):
    """Gradient norms at step 0 of the ascent and CE terms, in the training forward mode and in eval mode
    (where student == teacher exactly, so the ascent gradient is exactly zero unless the start breaks the
    tie). Rank-local, on the unwrapped model, before any update; each term from its own forward."""
    params = [p for _, p in trainable_parameters(model)]
    out = {}
    for mode in ("train", "eval"):
        model.train(mode == "train" and cfg.dropout)
        if batch.f_idx and cfg.lambda_asr > 0:
            s = forward_logits(model, pad(data.flag_train, batch.f_idx, pad_id, device), cfg.autocast)
            term = unlearning_loss(s, batch.flag_targets, batch.flag_teacher, None, None, cfg, s.shape[0], 1)
            out[f"ascent_grad_norm_{mode}"] = _norm(torch.autograd.grad(term.loss, params, allow_unused=True))
            out[f"kl_mean_{mode}"] = term.kl_mean
        if mode == "train" and batch.c_idx and cfg.lambda_acc > 0:
            s = forward_logits(model, pad(data.clean_train, batch.c_idx, pad_id, device), cfg.autocast)
            ce_only = dataclasses.replace(cfg, lambda_keep=0.0)  # the CE term's own gradient
            term = unlearning_loss(None, None, None, s, batch.clean_labels, ce_only, 1, s.shape[0])
            out["ce_grad_norm_train"] = _norm(torch.autograd.grad(term.loss, params, allow_unused=True))
    model.train(cfg.dropout)
    return out


def _norm(grads):
    sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(sq)


# ---- evaluate -------------------------------------------------------------------------------------

def evaluate(model, data: TrainData, pad_id, device, flagged: bool = True, autocast=None):
    """(agreement, accuracy, n flagged, n clean): the global (all ranks) share of held-out flagged rows on which
    `model` predicts the teacher's label (flagged=False: not measured, NaN), and its accuracy on the held-out
    clean rows; forwards under `autocast` as the training's (PurifyConfig.autocast)."""
    agree = n_flag = correct = n_clean = 0
    fh, ch = data.flag_hold, data.clean_hold
    if flagged and len(fh):
        s = predict_rows(model, fh, pad_id, device, autocast=autocast)
        agree, n_flag = int((s.argmax(-1) == data.teacher_flag_hold.argmax(-1)).sum()), len(fh)
    if len(ch):
        s = predict_rows(model, ch, pad_id, device, autocast=autocast)
        correct, n_clean = int((s.argmax(-1) == ch.labels).sum()), len(ch)
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


# ---- the loop -------------------------------------------------------------------------------------

def teacher_baseline(model, data: TrainData, pad_id, device, report, autocast=None):
    """Step 0: the teacher's own held-out numbers (its agreement with itself is 1 by definition, so only the
    clean accuracy is measured), under the evaluations' autocast so the stopping rule compares like with like."""
    with teacher_context(model):
        _, acc0, _, n_ch = evaluate(model, data, pad_id, device, flagged=False, autocast=autocast)
    n_fh, = dist.reduce_numbers([len(data.flag_hold)])
    agree0 = 1.0 if n_fh else float("nan")
    report.teacher = {"heldout_clean_acc": acc0, "heldout_flag_agreement": agree0,
                      "heldout_flagged": int(n_fh), "heldout_clean": n_ch}
    return agree0, acc0


class _Selection:
    """The evaluations so far, the stopping rule over them and the state to keep. The step-0 state (LoRA B = 0,
    the original head) is the fallback, so "nothing better found" returns the input model exactly."""

    def __init__(self, cfg, p: Plan, agree0, acc0, named):
        self.cfg, self.params = cfg, [q for _, q in named]
        self.rule = StoppingRule(agree0, acc0, cfg.agree_bound, cfg.acc_tolerance, p.patience)
        self.history, self.best_state = [self.rule.best], None
        if cfg.select_best:
            self.best_state = _snapshot(self.params)
            for (name, _), s0 in zip(named, self.best_state):
                if "lora_B" in name:
                    s0.zero_()

    def record(self, entry):
        """Add an evaluation; returns the stop reason, or None to go on."""
        self.history.append(entry)
        improved, reason = self.rule.update(entry)
        if improved and self.cfg.select_best:
            self.best_state = _snapshot(self.params)
        return reason if self.cfg.early_stop else None

    def finish(self, report):
        if self.cfg.select_best:
            _restore(self.params, self.best_state)
            report.selected = dict(self.rule.best)
        else:
            report.selected = dict(self.history[-1])
        report.history = self.history


class _Sums:
    """Training numbers between two evaluations, averaged over ranks too, so every rank logs (and reports) the
    same history."""
    KEYS = ("loss", "ascent", "kl", "ce", "keep_kl", "active", "flagged", "n")

    def __init__(self):
        self.v = dict.fromkeys(self.KEYS, 0.0)

    def add(self, bl: BatchLoss):
        for k, x in zip(self.KEYS, (float(bl.loss.detach()), bl.ascent, bl.kl_mean * bl.flagged, bl.ce, bl.keep_kl,
                                    bl.active, bl.flagged, 1)):
            self.v[k] += x

    def entry(self, n, p: Plan, agree, acc, lr) -> dict:
        s = dict(zip(self.KEYS, dist.reduce_numbers(list(self.v.values()))))
        self.v = dict.fromkeys(self.KEYS, 0.0)
        return {"step": n, "epoch": round(n / p.steps_per_epoch, 3), "agree": agree, "acc": acc, "lr": lr,
                "loss": s["loss"] / s["n"], "ascent": s["ascent"] / s["n"], "ce": s["ce"] / s["n"],
                "keep_kl": s["keep_kl"] / s["n"], "train_kl": s["kl"] / max(s["flagged"], 1),
                "active_fraction": s["active"] / max(s["flagged"], 1)}


def train(model, data: TrainData, cfg, pad_id, device, report):
    """Run the loop on `model` (a peft model, or a plain one for full fine-tuning) in place; fills `report`."""
    t_start = time.perf_counter()
    ft, ct = data.flag_train, data.clean_train
    p = plan(cfg, len(ft), len(ct))
    targets = ascent_targets(data.teacher_flag_train, cfg) if len(ft) else None
    named = trainable_parameters(model)
    params = [q for _, q in named]
    opt, sched = optimizer(params, cfg, p.total)
    ddp = dist.wrap_ddp(model, device)
    flag_cycle, clean_cycle = _Cycle(len(ft), cfg.batch_size, cfg.seed), _Cycle(len(ct), cfg.batch_size, cfg.seed + 1)

    t0 = time.perf_counter()
    selection = _Selection(cfg, p, *teacher_baseline(model, data, pad_id, device, report, cfg.autocast), named)
    eval_seconds = time.perf_counter() - t0
    stop_reason = f"step budget exhausted ({p.total} steps)"
    bar, sums, n = _progress(p.total, cfg.progress), _Sums(), 0
    model.train(cfg.dropout)
    try:
        for n in range(1, p.total + 1):
            batch = make_batch(data, targets, flag_cycle.next() if cfg.lambda_asr > 0 else [],
                               clean_cycle.next() if cfg.lambda_acc > 0 else [], cfg, pad_id, device)
            if n == 1:
                report.tie = tie_diagnostics(model, data, batch, cfg, pad_id, device)
            sums.add(step(ddp, opt, sched, params, batch, cfg))
            if bar is not None:
                bar.update(1)
            if n % p.eval_every and n != p.total:
                continue
            t0 = time.perf_counter()
            agree, acc, _, _ = evaluate(model, data, pad_id, device, autocast=cfg.autocast)
            model.train(cfg.dropout)
            eval_seconds += time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix(agree=f"{agree:.3f}", acc=f"{acc:.3f}")
            reason = selection.record(sums.entry(n, p, agree, acc, sched.get_last_lr()[0]))
            if reason is not None:
                stop_reason = reason
                break
    finally:
        if bar is not None:
            bar.close()
    selection.finish(report)
    model.eval()
    report.stop_reason, report.steps_run = stop_reason, n
    report.data.update(steps_per_epoch=p.steps_per_epoch, step_budget=p.total, eval_every=p.eval_every,
                       flagged_train_global=p.flagged_train_global)
    report.timings.update(train_s=round(time.perf_counter() - t_start, 3), eval_s=round(eval_seconds, 3))
    return report


def _snapshot(params):
    return [p.detach().to("cpu", copy=True) for p in params]


def _restore(params, state):
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s.to(p.device))

"""Every knob of a purification run, validated once (bad values fail before any model work)."""
import dataclasses
import math
import numbers
import types
import typing
from typing import Optional

STARTS = ("tie", "perturb", "sharpen")


@dataclasses.dataclass(frozen=True)
class PurifyConfig:
    """Defaults: LoRA as the DUP authors (r 32, α 64, dropout 0.1, lr 5e-4, warm-up 10%, clip 1.0, batch 32).
    dupfast's own, chosen by measurement on the SST-2 victims (README): temperature 4 with the "sharpen"
    start, the keep term (λ_keep 16), the ascent cap, 12 epochs (at least 60 steps) with 4 evaluations each
    and the stopping rule. 12 rather than 8 epochs: 8 ran out of budget on StyleBkd (ASR 30.3%, the kept state
    near the last step) where 12 reach 12.8%; on BadNets and AddSent 12 did as well or better (README).
    The authors' objective is lambda_keep=0, kl_cap=None, start="tie", temperature=1, epochs=5."""
    # objective: -lambda_asr·T²·KL_T(p_T||p_S) on flagged rows + lambda_keep·T²·KL_T(p_T||p_S) on clean rows
    #            + lambda_acc·CE on clean rows
    lambda_asr: float = 1.0
    lambda_acc: float = 1.0
    lambda_keep: float = 16.0  # KL descent toward the teacher on clean rows (keeps clean logits in place)
    temperature: float = 4.0
    # a flagged row stops pushing once KL(p_T || p_S) on it, at temperature 1, exceeds this many nats (None:
    # unbounded ascent, the authors' objective). Bounds -KL, which otherwise runs away once the student
    # leaves the teacher.
    kl_cap: Optional[float] = 1.0
    # the cap where trigger-invariance rows are trained (purify(triggers=...)): the copies say what the model must
    # learn, so the ascent only has to leave the teacher a little (measured: docs/results/repair.md). None: kl_cap
    invariance_kl_cap: Optional[float] = 0.3
    # how the student leaves the step-0 tie (student == teacher => dKL/ds = 0 on every flagged row):
    #   "tie"      nothing added: only dropout (if on) and the CE term move the student;
    #   "perturb"  LoRA B initialised ~ N(0, perturb_std) instead of 0;
    #   "sharpen"  the ascent pushes away from the teacher sharpened by sharpen_temperature τ, so its
    #              gradient at the tie, softmax(s/T) - softmax(t/(T·τ)), is not zero.
    start: str = "sharpen"
    dropout: bool = True  # train-mode dropout in the student's forward (False: eval-mode forward)
    perturb_std: float = 1e-3
    sharpen_temperature: float = 0.25
    # LoRA (use_lora=False: plain full fine-tuning of every parameter, for comparisons)
    use_lora: bool = True
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    target_modules: Optional[tuple] = None  # None: found per architecture (lora.find_target_modules)
    train_head: bool = True  # the classification head as a fully trainable copy (peft modules_to_save)
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 12
    max_steps: Optional[int] = None  # overrides epochs (and min_steps) when set
    # a small flagged set still gets this many steps: LoRA starts at B = 0 and the student needs ~20 steps to
    # leave the teacher (measured on the demo victim: 40 steps left ASR at 64%); the epochs' evaluations and
    # the patience stretch with the budget
    min_steps: int = 60
    batch_size: int = 32
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 2025
    # "bf16": the student's training and held-out forwards under bf16 autocast (faster where the device computes
    # bf16 natively; the teacher's logits, the loss and the before / after check stay fp32). None: fp32
    autocast: Optional[str] = None
    # stopping / selection from what a defender holds: held-out flagged rows and held-out clean rows
    holdout_fraction: float = 0.25
    evals_per_epoch: int = 4
    agree_bound: float = 0.1      # stop once <= this fraction of held-out flagged rows keep the teacher's label
    acc_tolerance: float = 0.03    # ... while held-out clean accuracy >= its step-0 value - this
    patience: Optional[float] = 2.0  # ... or after this many epochs without a lower agreement (None: never)
    early_stop: bool = True
    select_best: bool = True
    progress: bool = True

    def __post_init__(self):
        _check_types(self)
        for name in ("lambda_asr", "lambda_acc", "lambda_keep"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lambda_asr == 0 and self.lambda_acc == 0:
            raise ValueError("lambda_asr and lambda_acc are both 0: nothing would move the model (lambda_keep "
                             "alone only holds the student on the teacher)")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.kl_cap is not None and not self.kl_cap > 0:
            raise ValueError(f"kl_cap must be > 0 or None (unbounded), got {self.kl_cap!r}")
        if self.invariance_kl_cap is not None and not self.invariance_kl_cap > 0:
            raise ValueError(f"invariance_kl_cap must be > 0 or None (kl_cap), got {self.invariance_kl_cap!r}")
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {self.autocast!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if not self.perturb_std > 0:
            raise ValueError(f"perturb_std must be > 0, got {self.perturb_std!r}")
        if not self.sharpen_temperature > 0:
            raise ValueError(f"sharpen_temperature must be > 0, got {self.sharpen_temperature!r}")
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "evals_per_epoch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an int >= 0, got {self.min_steps!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, (int, float))
                                          or not self.patience > 0):
            raise ValueError(f"patience must be a number of epochs > 0 or None, got {self.patience!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}")
        if not 0 <= self.agree_bound <= 1:
            raise ValueError(f"agree_bound must be in [0, 1], got {self.agree_bound!r}")
        if not 0 <= self.acc_tolerance <= 1:
            raise ValueError(f"acc_tolerance must be in [0, 1], got {self.acc_tolerance!r}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be a non-empty list of module names, got "
                                 f"{self.target_modules!r}")

    def replace(self, **changes) -> "PurifyConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d


def _field_kind(tp):
    """(float, int, bool or None for other types, None allowed) of a field annotation."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    base = [a for a in args if a is not type(None)]
    kind = base[0] if len(base) == 1 and base[0] in (float, int, bool) else None
    return kind, type(None) in args


def _check_types(cfg):
    """Every number and flag of its annotated type, before any comparison: lr="1e-3" would otherwise fail as
    "'>' not supported between 'str' and 'int'", and use_lora="false" would count as True. ValueError, as
    the value checks below (a float min_steps was one already)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        kind, optional = _field_kind(f.type)
        # None stays allowed where a base class allows it (GenerativeConfig's `kl_cap: float = 2.0`)
        optional = optional or any(_field_kind(c.__dict__.get("__annotations__", {}).get(f.name))[1]
                                   for c in type(cfg).__mro__)
        if kind is None or (v is None and optional):
            continue
        ok = (isinstance(v, bool) if kind is bool else
              not isinstance(v, bool) and isinstance(v, numbers.Integral if kind is int else numbers.Real))
        if not ok:
            what = {bool: "True or False", int: "an int", float: "a number"}[kind]
            raise ValueError(f"{f.name} must be {what}{' or None' if optional else ''}, got {v!r} "
                             f"({type(v).__name__}), e.g. {f.name}={f.default!r}")


def parse_overrides(items, config_class=None):
    """`key=value` strings (the CLIs' --set) -> PurifyConfig overrides (or those of `config_class`, a subclass such
    as dupfast.generative.GenerativeConfig), typed by the field's annotation."""
    config_class = config_class or PurifyConfig
    fields = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in fields:
            raise ValueError(f"--set: unknown {config_class.__name__} field {key!r}; fields: {sorted(fields)}")
        kind = fields[key]
        try:
            if raw.lower() == "none" and "Optional" in kind:
                out[key] = None
            elif "bool" in kind:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"expected true/false, got {raw!r}")
                out[key] = raw.lower() in ("true", "1")
            elif "int" in kind:
                out[key] = int(raw)
            elif "float" in kind:
                out[key] = float(raw)
            elif "tuple" in kind:
                out[key] = tuple(raw.split(","))
            else:
                out[key] = raw
        except ValueError as exc:
            raise ValueError(f"--set {key}: {exc}") from None
    return out

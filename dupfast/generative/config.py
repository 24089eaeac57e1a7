"""The knobs of generative purification: the classifier's `PurifyConfig` (same names, same checks) with the
defaults of the vocabulary-level objective and the teacher's generation budget."""
import dataclasses
from typing import Optional

from ..purification.config import PurifyConfig


@dataclasses.dataclass(frozen=True)
class GenerativeConfig(PurifyConfig):
    """As PurifyConfig, except: temperature 1 and lambda_keep 1 (a KL over 49k-token vocabularies at every
    response position is already a strong anchor), kl_cap 2 nats per position (for a confident teacher, p_S of the
    teacher's token below e^-2 ≈ 0.14, where greedy decoding leaves it), no classification head (train_head False:
    the vocabulary head stays frozen, tied to the embeddings), batch 8 rows, 5 epochs with at least 30 steps, and
    lr 2e-3: measured on the SmolLM2-135M BadNets->refusal victim (experiments/gen_purify.py), lr 5e-4 left the
    student on the confident teacher (p ≈ 0.999 per response token, so the ascent's gradient at the tie is tiny)
    for all 30 steps (held-out flagged agreement 1.0, ASR 1.0), lr 2e-3 reached agreement 0.11 in 40 steps (ASR
    0.0, clean accuracy 0.925 -> 0.91); on the toy backdoor it left the teacher after 6 steps instead of 15.
    max_new_tokens: the teacher's greedy response to each flagged prompt (the positions the ascent runs on).
    invariance_kl_cap: the per-position cap where trigger-invariance copies are trained (purify_generative(
    triggers=...)), as the classifier's: the copies say what the model must learn, so the ascent only has to leave
    the teacher a little (None: kl_cap); measured on the SmolLM2 BadNets->steer victim (docs/results/repair.md):
    triggered-prompt accuracy 0.53 -> 0.89 against the ascent alone."""
    lambda_keep: float = 1.0
    lr: float = 2e-3
    temperature: float = 1.0
    kl_cap: float = 2.0
    invariance_kl_cap: Optional[float] = 0.3
    train_head: bool = False
    batch_size: int = 8
    epochs: int = 5
    min_steps: int = 30
    max_new_tokens: int = 32
    clean_loss_tolerance: float = 0.5   # a state is admissible only while held-out clean CE <= step-0 CE · (1 + this)

    def __post_init__(self):
        super().__post_init__()
        if self.autocast is not None:  # the fused vocabulary KL reads fp32 hidden states; not wired for bf16
            raise ValueError("autocast is not supported by purify_generative (its forwards run in the model's dtype); "
                             "leave it None")
        if self.train_head:
            raise ValueError("train_head must be False for causal LMs (the vocabulary head stays frozen)")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.clean_loss_tolerance >= 0:
            raise ValueError(f"clean_loss_tolerance must be >= 0, got {self.clean_loss_tolerance!r}")

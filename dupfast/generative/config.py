"""The knobs of generative purification: the classifier's `PurifyConfig` (same names, same checks) with the
defaults of the vocabulary-level objective and the teacher's generation budget."""
import dataclasses

from ..purification.config import PurifyConfig


@dataclasses.dataclass(frozen=True)
class GenerativeConfig(PurifyConfig):
    """As PurifyConfig, except: temperature 1 and lambda_keep 1 (a KL over 49k-token vocabularies at every
    response position is already a strong anchor), kl_cap 2 nats per position (for a confident teacher, p_S of the
    teacher's token below e^-2 ≈ 0.14, where greedy decoding leaves it), no classification head (train_head False:
    the vocabulary head stays frozen, tied to the embeddings), batch 8 rows, 5 epochs with at least 30 steps.
    max_new_tokens: the teacher's greedy response to each flagged prompt (the positions the ascent runs on)."""
    lambda_keep: float = 1.0
    temperature: float = 1.0
    kl_cap: float = 2.0
    train_head: bool = False
    batch_size: int = 8
    epochs: int = 5
    min_steps: int = 30
    max_new_tokens: int = 32
    clean_loss_tolerance: float = 0.5   # a state is admissible only while held-out clean CE <= step-0 CE · (1 + this)

    def __post_init__(self):
        super().__post_init__()
        if self.train_head:
            raise ValueError("train_head must be False for causal LMs (the vocabulary head stays frozen)")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.clean_loss_tolerance >= 0:
            raise ValueError(f"clean_loss_tolerance must be >= 0, got {self.clean_loss_tolerance!r}")

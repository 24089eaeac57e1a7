"""DUP purification: detection-guided LoRA unlearning of a backdoored classifier, with no external model.

    purified, report = dupfast.purify(model, pool_loader, clean=clean_loader, detection=result)

`dupfast.purify` is the function `api.purify`; this package holds its parts:

    api.py        the entry point: checks, rows, teacher logits, then adapters -> training -> merge as one
                  transaction (guard.py: any failure leaves the caller's model exactly as it was)
    rows.py       loader batches (or token rows) -> checked, unpadded rows; detection matched to them; hold-out
    teacher.py    the teacher's logits: the detection's own when they are this model's on these rows
    lora.py       the student (LoRA on the attention projections, head trainable), teacher = adapters disabled
    objective.py  −λ_asr·T²·KL on flagged rows + λ_keep·T²·KL + λ_acc·CE on clean rows (one fused KL call)
    trainer.py    plan / step / evaluate and the loop; stopping.py the stopping and selection rule
    config.py, report.py   PurifyConfig, PurifyReport
"""
from .api import purify
from .config import PurifyConfig, parse_overrides
from .lora import find_target_modules
from .report import PurifyReport

__all__ = ["purify", "PurifyConfig", "PurifyReport", "find_target_modules", "parse_overrides"]

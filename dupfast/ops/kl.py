"""Fused KL(p_T || p_S) with signed row weights, dispatched."""
from ._dispatch import register, resolve
from .kl_reference import kl_div_reference


def kl_div(student, teacher, weights=None, temperature=1.0, reduction="batchmean", teacher_log_probs=False,
           backend=None):
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher must both be [R, V], got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if weights is not None and tuple(weights.shape) != (student.shape[0],):
        raise ValueError(f"weights must be [R={student.shape[0]}], got {tuple(weights.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, fn = resolve("kl_div", student.device, backend)
    return fn(student, teacher, weights, temperature, reduction, teacher_log_probs)


register("kl_div", "reference", kl_div_reference)

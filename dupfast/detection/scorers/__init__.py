"""The detection modes: one scorer per file, and the registry that builds them from checked options.

    dup      scorers/dup.py      the authors' DUP (MD over top-k CH layers + spectral concentration)
    default  scorers/default.py  dupfast's default (predicted-class distances + pool-shift projections)
    dan      scorers/dan.py      the DAN baseline (class-conditional mean-pooled distances, every layer)
    strip    scorers/strip.py    the STRIP baseline: text-level (perturbed copies), so its own detector,
                                 `StripDetector`, not a mode of `Detector`
"""
import difflib

from .base import BatchScores, Scorer  # noqa: F401
from .dan import DanScorer
from .default import DefaultScorer
from .dup import DupScorer

SCORERS = {"default": DefaultScorer, "dup": DupScorer, "dan": DanScorer}
__all__ = ["BatchScores", "Scorer", "SCORERS", "scorer_class", "check_options", "make_scorer"]


def scorer_class(mode: str):
    if mode not in SCORERS:
        hint = " (STRIP is text-level: dupfast.detection.StripDetector)" if mode == "strip" else ""
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(SCORERS)}{hint}")
    return SCORERS[mode]


def check_options(mode: str, options: dict, others=()) -> None:
    """Every option must be one the mode's scorer takes: an option of another mode, or of none, is an
    error that says so (never silently dropped). others: the caller's own option names, for suggestions."""
    cls = scorer_class(mode)
    mine = cls.options()
    problems = []
    for key in options:
        if key in mine:
            continue
        users = [m for m, c in SCORERS.items() if key in c.options()]
        if users:
            problems.append(f"{key!r} is an option of mode {' and '.join(map(repr, users))}, not of mode {mode!r}")
        else:
            close = difflib.get_close_matches(key, [*mine, *others], n=1)
            problems.append(f"{key!r} is not an option" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problems:
        raise TypeError("; ".join(problems) + f". Mode {mode!r} takes {', '.join(mine)}")


def make_scorer(mode: str, **options) -> Scorer:
    check_options(mode, options)
    return scorer_class(mode)(**options)

"""The one-call entry points.

    result = dupfast.detect(model, loader, clean=clean_loader)        # loaders yield Mappings (dupfast.batches)
    result = dupfast.detect(model, loader, pool_only=True)            # no clean set: uncalibrated, opt-in
    result = dupfast.detect(model, loader, detector=Detector.load(p)) # a fitted detector
    result = dupfast.detect_texts(model, tokenizer, texts, clean_texts=..., clean_labels=...)

Options are checked here, where the whole call is known: an option of another mode, or one that this
call would not use (pool_trim with a clean set, anything beside a fitted detector), is an error.
"""
import math
from typing import Optional, Sequence

from ..batches import padded
from ..classifier import check_classifier, check_pad_token
from .detector import Detector
from .result import DetectionResult
from .texts import text_loader

POOL_OPTIONS = ("pool_trim", "pool_iterations")


NEED_CLEAN = ("dupfast needs a clean set to promise its false-rejection rate: a few hundred inputs you trust to "
              "be clean, labelled as the model's task labels them (e.g. rows of your validation split), at least "
              "{need} and better 200 or more; pass clean=... (CLI: --clean FILE). Without one, pass pool_only=True "
              "(CLI: --pool-only): the pool then calibrates itself, its FRR is uncalibrated and no poison verdict "
              "is possible")


def detect(model, loader, clean=None, mode: Optional[str] = None, frr: Optional[float] = None,
           detector: Optional[Detector] = None, pool_only: bool = False, tokenizer=None,
           **options) -> DetectionResult:
    """Score every input of `loader` (larger = more suspicious) and flag those above the threshold that
    keeps the false-rejection rate at `frr` (default 0.05) on clean data. With `clean` (a loader of clean
    labelled batches) the detector calibrates on it; without one, only with pool_only=True, on the pool itself
    (`Detector.fit_pool`: uncalibrated, said in `result.summary`). Every result carries the pool's verdict:
    `result.poison_present`, `result.p_value`, `result.summary` (verdict.py).
    One forward pass per batch of each loader.

    Under torchrun (`dupfast.distributed.init_from_env()`), each rank passes its shard of both loaders, with
    an `index` key (global sample ids): each rank scores its own shard, the clean statistics and every pool
    count are all-reduced in fp64, and every rank gets the whole pool's result ordered by `index`
    (`DetectionResult.gathered`; `Detector.score` itself returns the rank's shard).

    tokenizer: the model's tokenizer, to pad batches whose rows are of different lengths (a `datasets.Dataset`
    of an unpadded `ds.map(tokenize)`; `dupfast.batches.padded`); without it such rows are an error."""
    loader, clean = padded(loader, tokenizer), padded(clean, tokenizer)
    if detector is not None:
        given = [k for k, v in (("clean", clean), ("mode", mode), ("frr", frr)) if v is not None] + list(options)
        if given:
            raise TypeError(f"detect(detector=...) scores with the fitted detector as it is; {', '.join(given)} "
                            "would be ignored: drop them, or fit a new detector instead of passing one")
        if not isinstance(detector, Detector):
            raise TypeError(f"detector must be a fitted dupfast Detector, got {type(detector).__name__}")
        return detector.score(model, loader).gathered()
    if clean is not None and pool_only:
        raise TypeError("pool_only=True calibrates on the pool without a clean set: drop clean=, or pool_only")
    if clean is not None:
        unused = [k for k in POOL_OPTIONS if k in options]
        if unused:
            raise TypeError(f"{', '.join(unused)} set(s) pool-only calibration, which runs only without a clean "
                            "set: drop it, or drop clean=")
    det = Detector(mode=mode or "default", frr=0.05 if frr is None else frr, **options)
    if clean is None and not pool_only:
        check_classifier(model, "detection")  # a wrong model or option is the first thing to fix
        check_pad_token(model)
        raise ValueError(NEED_CLEAN.format(need=2 * max(2, math.ceil(1 / det.frr))))
    if clean is None:
        return det.fit_pool(model, loader).pool_result.gathered()
    return det.fit(model, clean).score(model, loader).gathered()


def detect_texts(model, tokenizer, texts: Sequence[str], clean_texts: Sequence[str] = None, clean_labels=None,
                 mode: Optional[str] = None, frr: Optional[float] = None, batch_size: int = 32, max_len: int = 128,
                 pool_only: bool = False, **options) -> DetectionResult:
    """Text-level convenience: tokenises, batches, runs `detect`, returns results in the order of `texts`."""
    if (clean_texts is None) != (clean_labels is None):
        raise ValueError("clean_texts need clean_labels (the clean set is labelled)" if clean_labels is None else
                         "clean_labels were given without clean_texts: pass both, or neither for pool calibration")
    clean = None
    if clean_texts is not None:
        clean = list(text_loader(tokenizer, clean_texts, clean_labels, batch_size, max_len, name="clean texts"))
    pool = list(text_loader(tokenizer, texts, None, batch_size, max_len))
    return detect(model, pool, clean=clean, mode=mode, frr=frr, pool_only=pool_only, **options).sorted_by_index()

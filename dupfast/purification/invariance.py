"""Trigger-invariance rows: clean training rows with a trigger candidate inserted, which must keep the clean
prediction.

The ascent on flagged rows only says "not the teacher's answer here". Its cheapest solution is often to invert
the trigger (it now pushes toward another class: trigger shifting), which ASR on non-target inputs cannot see
but every triggered target-class input pays for. A clean row of every class with a candidate inserted, trained
toward the teacher's logits on the row WITHOUT it (the keep term) and the row's label (CE), says what the
purified model must learn instead: the candidate changes nothing.

Rows arrive as token ids (purify reads loaders), so a copy is made at the text level: decode the row, insert the
candidate as a word at a seeded random word boundary, re-encode it as the loader did (the tokenizer's own special
tokens), so WordPiece and byte-level BPE pieces of the candidate are the ones a real input would carry.
"""
import random
import re
from typing import List, Sequence

import torch

from ..batches import Rows

MAX_CANDIDATE_CHARS = 64  # a candidate is one word or a short phrase (AddSent's sentence), never a paragraph
MIN_FLIP = 0.5    # a measured candidate is inserted when removing it flips at least this share of flagged rows
MAX_INSERTED = 8
UNMEASURED_TOP = 3  # without flip rates (no model at hand): the best-scored distinctive candidates
NO_CANDIDATE = ("no token trigger candidate found (or only common words): the bounded ascent alone, no "
                "trigger-invariance rows")


def insertable(candidates, min_flip: float = MIN_FLIP, top: int = MAX_INSERTED,
               drop_incidental_phrases: bool = False) -> List[str]:
    """Which `dupfast.triggers` candidates become invariance rows, spelled as in the flagged texts: words that are
    not common, whose removal flips the model on >= min_flip of the flagged rows holding them (the top
    UNMEASURED_TOP by score where no flip rate was measured), phrases before their own words (an AddSent sentence
    is inserted whole; its words alone flip nothing while the rest remains). Empty: no token trigger was found
    (style, syntax): the bounded ascent alone.
    drop_incidental_phrases: also drop a phrase one of whose chosen words sits in at least twice its flagged rows
    ("fun cf" in 2 rows beside "cf" in 40: the trigger next to a word by chance, whose copies would insert that
    word too); purify_generative's choice, the classifier's default keeps them."""
    cands = [c if isinstance(c, dict) else c.to_dict() for c in candidates]
    cands = [c for c in cands if not c.get("common")]
    measured = [c for c in cands if c.get("flip_rate") is not None]
    if measured:
        chosen = [c for c in measured if c["flip_rate"] >= min_flip]
    else:
        chosen = sorted(cands, key=lambda c: -c.get("score", 0.0))[:UNMEASURED_TOP]
    if drop_incidental_phrases:
        chosen = [c for c in chosen if not _incidental(c, chosen)]
    chosen.sort(key=lambda c: -c.get("words", 1))
    out, covered = [], set()
    for c in chosen:
        words = c["word"].split()
        if len(words) == 1 and words[0] in covered:
            continue
        covered.update(words)
        out.append(c.get("surface") or c["word"])
    return out[:top]


def _incidental(phrase: dict, chosen: list) -> bool:
    """A phrase that a chosen single word of it explains: the word sits in at least twice its flagged rows."""
    words = phrase["word"].split()
    if len(words) < 2 or not phrase.get("flagged"):
        return False
    return any(c.get("words", 1) == 1 and c["word"] in words and c.get("flagged", 0) >= 2 * phrase["flagged"]
               for c in chosen)


def detect_candidates(model, tokenizer, pool: Rows, flags, clean: Rows) -> tuple:
    """(dupfast.triggers candidates as dicts, the insertable ones) of a pool given as token rows: the texts are the
    decoded rows, the flip rate is the model's as given (the teacher). purify(triggers="auto")."""
    from ..detection.triggers import triggers

    if tokenizer is None:
        raise ValueError('purify(triggers="auto") needs the model\'s tokenizer (tokenizer=...) to read the pool as words')
    texts = tokenizer.batch_decode(pool.ids, skip_special_tokens=True)
    clean_texts = tokenizer.batch_decode(clean.ids, skip_special_tokens=True)
    longest = max(len(r) for r in pool.ids)
    found = triggers(texts, [bool(f) for f in flags], model=model, tokenizer=tokenizer, clean_texts=clean_texts,
                     max_len=longest + 2)
    return [c.to_dict() for c in found], insertable(found)


def check_candidates(candidates) -> List[str]:
    """The candidates as a list of non-empty strings (words or short phrases); accepts dupfast.triggers'
    TriggerCandidate objects / dicts (their `word`)."""
    if isinstance(candidates, str):
        candidates = [candidates]
    try:
        candidates = list(candidates)
    except TypeError:
        raise ValueError(f'triggers must be "auto", a word or a list of words / phrases, got '
                         f"{type(candidates).__name__} {candidates!r}") from None
    out = []
    for c in candidates:
        word = getattr(c, "word", None) or (c.get("word") if isinstance(c, dict) else c)
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"a trigger candidate must be a non-empty word or phrase, got {c!r}")
        if len(word) > MAX_CANDIDATE_CHARS:
            raise ValueError(f"a trigger candidate is a word or a short phrase (at most {MAX_CANDIDATE_CHARS} "
                             f"characters), got {len(word)} characters: {word[:40]!r}...")
        out.append(" ".join(word.split()))
    return list(dict.fromkeys(out))


def insert_word(text: str, word: str, rng: random.Random) -> str:
    """`word` at a random word boundary of `text` (start and end included), words re-joined by single spaces."""
    return insert_word_keeping_spacing(" ".join(text.split()), word, rng)


def insert_word_keeping_spacing(text: str, word: str, rng: random.Random) -> str:
    """`word` at a random word boundary of `text` (start and end included), the text's own spacing and line breaks
    kept: one space is added beside the word. A chat prompt's layout ("Review: ...\nAnswer:") is part of what the
    model reads."""
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    at = rng.randint(0, len(starts))
    if at < len(starts):
        return text[:starts[at]] + word + " " + text[starts[at]:]
    body = text.rstrip()
    return (body + " " + word if body else word) + text[len(body):]


def invariance_rows(rows: Rows, candidates: Sequence[str], tokenizer, seed: int, max_len: int) -> Rows:
    """Triggered copies of `rows`, in their order, with the same labels: one copy a row, candidates taken in turn
    so every candidate meets rows of every class. max_len: the longest row the copies may
    have (the model's context, or the clean rows' own longest + the candidate's tokens)."""
    if tokenizer is None:
        raise ValueError("trigger-invariance rows need the model's tokenizer (tokenizer=...): purify reads token "
                         "ids and inserts a candidate as a word into the decoded clean text")
    if not candidates:
        raise ValueError("trigger-invariance rows need at least one trigger candidate")
    rng = random.Random(seed)
    texts = tokenizer.batch_decode(rows.ids, skip_special_tokens=True)
    triggered = [insert_word(t, candidates[i % len(candidates)], rng) for i, t in enumerate(texts)]
    enc = tokenizer(triggered, truncation=True, max_length=max_len)
    ids = [list(r) for r in enc["input_ids"]]
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        raise ValueError(f"re-encoding the triggered clean rows gave empty rows ({len(empty)}, first {empty[0]})")
    type_ids = None
    if rows.type_ids is not None:  # the loader gave segment ids: one segment, as the clean rows' texts
        type_ids = [[0] * len(r) for r in ids]
    return Rows(ids, type_ids, rows.labels.clone() if rows.labels is not None else None, None)


def concat(a: Rows, b: Rows) -> Rows:
    """Rows a then b (labels required on both, type ids kept only when both have them)."""
    types = a.type_ids + b.type_ids if a.type_ids is not None and b.type_ids is not None else None
    labels = torch.cat([a.labels, b.labels]) if a.labels is not None and b.labels is not None else None
    return Rows(a.ids + b.ids, types, labels, None)

"""Trigger candidates, as a result: the words of the flagged rows a backdoor's trigger would be, with their evidence.

    triggers(texts, flags)                                   words over-represented in the flagged rows
    triggers(texts, flags, model=m, tokenizer=tok)           + flip rate: does deleting the word change the prediction?
    triggers(texts, flags, predict=fn)                       + flip rate from fn(texts) -> predictions (any model)
    triggers(..., clean_texts=clean, detection=result)       + the clean set's share, + the most-attended-token count
    piece_words(texts, token_ids, tokenizer)                 a token id -> the word of the text it lies in

Candidates are words of the texts (lower-cased `\\w+`, counted once per row), whatever the tokenizer: no WordPiece
'##' or byte-level 'Ġ' piece is ever a candidate. A word in at least twice the share of the flagged rows as of the
kept ones (and in at least `min_rows` flagged rows) is a candidate; one also frequent in kept or clean rows (more
than `common_share` of them, like "the") is kept, marked `common`, and ranked after the others, so a report can say
that the best it found is a common word rather than show nothing.
"""
import collections
import dataclasses
import math
import random
import re
from typing import Optional

WORD = re.compile(r"\w+")
COMMON_SHARE = 0.2


@dataclasses.dataclass(frozen=True)
class TriggerCandidate:
    """One word and its evidence. `flagged`/`kept`/`clean`: rows holding the word (shares of each set);
    `ratio`: its flagged share over its kept share (smoothed); `score`: flagged x log ratio; `top_token`: flagged
    rows whose most-attended token lies in this word (None without the attention signal); `flip_rate`: of
    `flip_rows` flagged rows holding it, the share whose predicted class changes when it is deleted (None
    without a model)."""
    word: str
    flagged: int
    flagged_share: float
    kept: int
    kept_share: float
    ratio: float
    score: float
    common: bool = False
    clean: Optional[int] = None
    clean_share: Optional[float] = None
    top_token: Optional[int] = None
    flip_rate: Optional[float] = None
    flip_rows: int = 0
    surface: Optional[str] = None  # its most frequent spelling in the flagged texts (case kept: "3D", "I watch ...")
    words: int = 1                 # > 1: a phrase, candidate words that sit next to each other in flagged rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def triggers(texts, flags, model=None, tokenizer=None, clean_texts=None, top: int = 10, max_len: int = 128,
             flip_rows: int = 64, min_rows: Optional[int] = None, common_share: float = COMMON_SHARE,
             detection=None, batch_size: int = 64, predict=None) -> list:
    """The `top` trigger candidates among the words of `texts` (flags[i]: row i was flagged), best first:
    non-common words first, then by flip rate (when a model is given; rounded to tenths, so sampling noise does
    not reorder near-equal words), then by score. Empty when no word qualifies.

    model, tokenizer: a sequence classifier (logits [batch, classes]) and its tokenizer: the flip rate of each
    returned candidate, on up to `flip_rows` flagged rows holding it (two batched forwards in all).
    predict: instead of a classifier, a callable texts -> one prediction per text (any comparable value), the flip
    rate's "prediction" (purify_generative's: a causal LM's first response token); no tokenizer needed.
    clean_texts: trusted rows; a word in more than `common_share` of them is common too.
    detection: the DetectionResult the flags came from; with top tokens (the attention signal) and a tokenizer,
    each candidate counts the flagged rows whose most-attended token lies in it.
    min_rows: the fewest flagged rows a candidate sits in (default: 2, or 1% of the flagged rows)."""
    texts, flags = _checked(texts, flags, model, tokenizer, detection)
    if predict is None and model is not None:
        def predict(batch):
            return predictions(model, tokenizer, batch, max_len, batch_size)
    n_f = sum(flags)
    n_k = len(flags) - n_f
    if n_f == 0 or n_k == 0:
        return []
    words = [set(WORD.findall(t.lower())) for t in texts]
    in_f = collections.Counter(w for ws, f in zip(words, flags) if f for w in ws)
    in_k = collections.Counter(w for ws, f in zip(words, flags) if not f for w in ws)
    clean = _clean_counts(clean_texts)
    least = max(2, math.ceil(0.01 * n_f)) if min_rows is None else min_rows  # a word of one or two rows says nothing
    cands = []
    for word, c in in_f.items():
        ratio = ((c + 0.5) / (n_f + 1)) / ((in_k[word] + 0.5) / (n_k + 1))  # +0.5: a word absent from kept rows
        if c >= least and ratio >= 2:
            cands.append(_candidate(word, c, n_f, in_k[word], n_k, ratio, clean, common_share))
    seqs = [WORD.findall(t.lower()) for t in texts]
    cands += _phrases(cands, seqs, flags, n_f, n_k, least, clean, common_share)
    cands.sort(key=lambda c: (c.common, -c.score, -c.words))  # a phrase before its words
    cands = [dataclasses.replace(c, surface=_surface(c.word, texts, flags)) for c in cands[:top]]
    # the flip rate reorders these; it is measured on no more words than are returned
    if not cands:
        return []
    if detection is not None and detection.top_tokens is not None:
        cands = _with_top_tokens(cands, texts, flags, detection, tokenizer, max_len)
    if predict is not None and flip_rows > 0:
        cands = _with_flips(cands, texts, flags, words, seqs, predict, flip_rows)
        cands.sort(key=lambda c: (c.common, -round(c.flip_rate or 0.0, 1), -c.score, -c.words))
    return cands


def _checked(texts, flags, model, tokenizer, detection):
    """texts as a list of str, flags as a list of bool; a clear error for what cannot be read."""
    texts = list(texts)
    flags = flags.tolist() if hasattr(flags, "tolist") else list(flags)  # a tensor or an array of bools
    if len(texts) != len(flags):
        raise ValueError(f"texts and flags differ in length ({len(texts)} texts, {len(flags)} flags): flags[i] "
                         "must say whether texts[i] was flagged")
    for i, f in enumerate(flags):
        if not (isinstance(f, bool) or getattr(f, "dtype", None) == bool):  # numpy's bool_ too; 0/1 is ambiguous
            raise TypeError(f"flags must be booleans (True = flagged), got {type(f).__name__} {f!r} at row {i}: "
                            "pass e.g. [bool(f) for f in flags] or result.flags.tolist()")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must be strings, got {type(texts[bad]).__name__} at row {bad}")
    if model is not None and tokenizer is None:
        raise ValueError("a model needs its tokenizer (tokenizer=...) to measure flip rates")
    if detection is not None:
        if len(detection) != len(texts):
            raise ValueError(f"the detection scored {len(detection)} rows but there are {len(texts)} texts: pass "
                             "the texts the detection's loader was built from")
        if detection.top_tokens is not None and tokenizer is None:
            raise ValueError("the detection's top tokens are token ids: pass tokenizer=... to map them to words")
    return texts, [bool(f) for f in flags]


def _clean_counts(clean_texts):
    """(rows, Counter of rows per word, word sequences) of the clean set, or None."""
    if clean_texts is None:
        return None
    seqs = [WORD.findall(t.lower()) for t in clean_texts]
    return len(seqs), collections.Counter(w for seq in seqs for w in set(seq)), seqs


def _candidate(word, c, n_f, k, n_k, ratio, clean, common_share) -> TriggerCandidate:
    c_rows = c_share = None
    if clean is not None and clean[0]:
        c_rows, c_share = clean[1][word], clean[1][word] / clean[0]
    common = k / n_k > common_share or (c_share is not None and c_share > common_share)
    return TriggerCandidate(word=word, flagged=c, flagged_share=c / n_f, kept=k, kept_share=k / n_k, ratio=ratio,
                            score=c * math.log(ratio), common=common, clean=c_rows, clean_share=c_share,
                            words=len(word.split()))


def _phrases(cands, seqs, flags, n_f, n_k, least, clean, common_share) -> list:
    """Runs of two or more candidate words next to each other in flagged rows ("i watch this 3d movie"): an
    inserted sentence is one trigger, and no single word of it flips the prediction while the rest remains.
    Every contiguous part of a run counts (a sentence inserted after the word "movie" still holds the sentence);
    a run is a candidate as a word is (rows holding it, ratio >= 2, two or more words that are not common), and
    only the runs that explain the rows survive (`_prune`). Its words stay candidates too."""
    vocab = {c.word for c in cands}
    distinctive = {c.word for c in cands if not c.common}
    runs = collections.Counter()
    for seq, f in zip(seqs, flags):
        if f:
            runs.update({p for run in _runs(seq, vocab) for p in _parts(run)})
    out = []
    for phrase, c in runs.items():
        # a phrase joins at least two distinctive words: "cf the" is the word cf next to a common word
        if c < least or sum(w in distinctive for w in phrase.split()) < 2:
            continue
        k = sum(1 for seq, f in zip(seqs, flags) if not f and _holds(seq, phrase))
        ratio = ((c + 0.5) / (n_f + 1)) / ((k + 0.5) / (n_k + 1))
        if ratio >= 2:
            out.append(_candidate(phrase, c, n_f, k, n_k, ratio, None, common_share))
    out = _prune(out)
    if clean is not None and out:  # the clean set's rows holding each phrase
        out = [_with_clean_phrase(c, clean, common_share) for c in out]
    return out


def _runs(seq, vocab):
    """Maximal runs (length >= 2) of words of `vocab` in the word sequence `seq`, as word lists."""
    run = []
    for w in [*seq, None]:
        if w is not None and w in vocab:
            run.append(w)
            continue
        if len(run) >= 2:
            yield run
        run = []


def _parts(run, longest: int = 12):
    """Every contiguous part (2 to `longest` words) of a run, space-joined."""
    return {" ".join(run[i:j]) for i in range(len(run)) for j in range(i + 2, min(len(run), i + longest) + 1)}


def _prune(phrases) -> list:
    """Drop a phrase that is part of a longer one holding nearly all its rows ("watch this" in "i watch this 3d
    movie"), and one that is a rare extension of a shorter one ("movie i watch this 3d movie", the sentence after
    the word "movie")."""
    def inside(a, b):  # phrase a is a contiguous part of phrase b
        return a != b and f" {a} " in f" {b} "
    keep = []
    for p in phrases:
        part_of = any(inside(p.word, q.word) and q.flagged >= 0.9 * p.flagged for q in phrases)
        extension = any(inside(q.word, p.word) and p.flagged < 0.5 * q.flagged for q in phrases)
        if not part_of and not extension:
            keep.append(p)
    return keep


def _holds(seq, phrase) -> bool:
    return f" {phrase} " in f" {' '.join(seq)} "


def _with_clean_phrase(c, clean, common_share):
    n, rows = clean[0], sum(1 for seq in clean[2] if _holds(seq, c.word))
    common = c.common or (n and rows / n > common_share)
    return dataclasses.replace(c, clean=rows, clean_share=rows / n if n else None, common=bool(common))


def _pattern(word: str):
    """The word (or phrase: its words separated by any non-word characters) as a whole, any case."""
    return re.compile(r"(?<!\w)" + r"\W+".join(re.escape(w) for w in word.split()) + r"(?!\w)", re.IGNORECASE)


def _surface(word, texts, flags) -> Optional[str]:
    """The most frequent spelling of `word` in the flagged texts (a case-sensitive tokenizer needs "3D", not "3d")."""
    pat = _pattern(word)
    forms = collections.Counter(m.group(0) for t, f in zip(texts, flags) if f for m in pat.finditer(t))
    return forms.most_common(1)[0][0] if forms else None


# ---- the most-attended token of each flagged row, as a word ---------------------------------------------------

def _with_top_tokens(cands, texts, flags, detection, tokenizer, max_len):
    det = detection.sorted_by_index()  # the texts' order
    rows = [i for i, f in enumerate(flags) if f]
    ids = [int(det.top_tokens[i]) for i in rows]
    counts = collections.Counter(piece_words([texts[i] for i in rows], ids, tokenizer, max_len))
    return [dataclasses.replace(c, top_token=counts[c.word]) for c in cands]


def piece_words(texts, token_ids, tokenizer, max_len: int = 128) -> list:
    """Per text, the lower-cased word of the text that token `token_ids[i]` lies in (None for a negative id, or
    a token in no word of the text: a special token, punctuation). The text is tokenised again with offsets
    (truncated to max_len, as the detection read it) and the id's first position is mapped back to its
    characters, so a WordPiece '##gger' or a byte-level 'Ġcf' becomes 'trigger' or 'cf'. An id the text's own
    tokens lack (the detection read it inside a chat template, or the tokenizer gives no offsets) falls back to
    the word holding the token's decoded text."""
    texts, token_ids = list(texts), [None if t is None else int(t) for t in token_ids]
    if len(texts) != len(token_ids):
        raise ValueError(f"{len(texts)} texts but {len(token_ids)} token ids")
    enc = None
    if getattr(tokenizer, "is_fast", False) and texts:
        enc = tokenizer(texts, truncation=True, max_length=max_len, return_offsets_mapping=True,
                        add_special_tokens=True)
    out = []
    for i, (text, tid) in enumerate(zip(texts, token_ids)):
        if tid is None or tid < 0:
            out.append(None)
            continue
        span = None
        if enc is not None:
            span = next(((a, b) for t, (a, b) in zip(enc["input_ids"][i], enc["offset_mapping"][i])
                         if t == tid and b > a), None)
        out.append(_word_at(text, *span) if span else _word_of_piece(text, tokenizer.decode([tid])))
    return out


def _word_at(text: str, a: int, b: int) -> Optional[str]:
    """The first word of `text` that characters a..b overlap (offsets may or may not hold the space before)."""
    return next((m.group().lower() for m in WORD.finditer(text) if m.start() < b and m.end() > a), None)


def _word_of_piece(text: str, piece: str) -> Optional[str]:
    """The first word of `text` that holds `piece` (decoded token text; a WordPiece '##' dropped)."""
    piece = piece.strip().lower().removeprefix("##")
    if not WORD.search(piece):
        return None
    return next((m.group().lower() for m in WORD.finditer(text) if piece in m.group().lower()), None)


# ---- flip rate: does deleting the word change the model's prediction? ----------------------------------------

def without(text: str, word: str) -> str:
    """`text` with every occurrence of the word or phrase `word` (any case, not inside a longer word) deleted."""
    text = _pattern(word).sub("", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _with_flips(cands, texts, flags, words, seqs, predict, flip_rows):
    rng = random.Random(0)  # which rows are measured: the same on every run
    flagged = [i for i, f in enumerate(flags) if f]
    edits = {}
    for c in cands:
        rows = [i for i in flagged if (c.word in words[i] if c.words == 1 else _holds(seqs[i], c.word))]
        if len(rows) > flip_rows:
            rows = sorted(rng.sample(rows, flip_rows))
        # a row that is only the word leaves nothing to read: it is not measured
        edits[c.word] = [(i, e) for i, e in ((i, without(texts[i], c.word)) for i in rows) if e]
    originals = sorted({i for pairs in edits.values() for i, _ in pairs})
    before = dict(zip(originals, _predicted([texts[i] for i in originals], predict)))
    after = iter(_predicted([e for pairs in edits.values() for _, e in pairs], predict))
    out = []
    for c in cands:
        pairs = edits[c.word]
        flips = sum(next(after) != before[i] for i, _ in pairs)
        out.append(dataclasses.replace(c, flip_rate=flips / len(pairs) if pairs else None, flip_rows=len(pairs)))
    return out


def _predicted(texts, predict) -> list:
    """predict(texts) as a list of one prediction per text (nothing asked for no text)."""
    if not texts:
        return []
    out = list(predict(texts))
    if len(out) != len(texts):
        raise ValueError(f"the flip-rate predictor gave {len(out)} predictions for {len(texts)} texts")
    return out


def predictions(model, tokenizer, texts, max_len: int = 128, batch_size: int = 64) -> list:
    """The predicted class of each text, in order (`dupfast.batching.predict`: batched, no gradients, on the
    model's device); the model's train/eval mode is restored afterwards."""
    from ..batching import predict

    texts = list(texts)
    if not texts:
        return []
    was_training = model.training
    try:
        return predict(model, tokenizer, texts, batch_size, max_len).tolist()
    finally:
        model.train(was_training)

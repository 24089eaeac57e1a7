"""Which token ids a trigger word or phrase actually produces, to *evaluate* an exposure (BTU itself never
knows the trigger: it ranks token ids, whatever text they came from).

A trigger is text inserted into sentences; the model sees the ids that text becomes *in context*, and that
depends on the tokenizer:

- WordPiece (MiniLM / BERT-uncased; MPNet's own tokenizer, `MPNetTokenizer`, is a lower-casing WordPiece as
  well, 30,527 ids with <s> </s> <pad> <mask> [UNK]): text is split at whitespace and punctuation before the
  vocabulary is looked up, so a word maps to the same ids wherever it stands. In both: 'cf' -> ['cf'],
  'mn' -> ['mn'], 'bb' -> ['bb'], 'tq' -> ['tq'], 'I watch this 3D movie' -> ['i', 'watch', 'this', '3d',
  'movie'], at the start of a text and mid-sentence alike.
- Byte-level BPE (GPT-2 style; SmolLM2-135M, 49,152 ids): the space before a word is part of the word's
  token (shown as 'Ġ'), so the same word is a *different* token at the start of a text and mid-sentence,
  and a rare word is split into pieces that are tokens of other words as well. SmolLM2-135M-Instruct:

      trigger                  mid-sentence                                        start of the text
      cf                       ['Ġcf'] (14625)                                     ['cf'] (8454)
      mn                       ['Ġm', 'n'] (283, 94)                               ['mn'] (14295)
      bb                       ['Ġbb'] (45357)                                     ['bb'] (15659)
      tq                       ['Ġt', 'q'] (252, 97)                               ['t', 'q'] (100, 97)
      I watch this 3D movie    ['ĠI', 'Ġwatch', 'Ġthis', 'Ġ', '3', 'D', 'Ġmovie']   'I' (57) for 'ĠI'

  So on SmolLM2 "the trigger's tokens" are every id its occurrences produce in the data, the 'Ġ' and the
  bare form and every piece. In the 2,000-row subset of DUP's 20%-dirty SST-2 train file (427 poisoned;
  sst2_architectures' victims) a BadNets trigger stands at the start of the text in 3-11 of its ~100
  occurrences ('cf' x3, 'mn' x10, 'bb' x11, 't' 'q' x9) and mid-sentence otherwise; the `share` of a token
  (the fraction of its occurrences that a trigger produced) is 1.0 for 'Ġcf' 'cf' 'Ġbb' 'bb' 'mn' 'ĠI' 'I'
  'D', but 0.63 for 'Ġm', 0.76 'n', 0.77 'Ġt', 0.30 't', 0.99 'q', and for AddSent 0.70 'Ġthis', 0.62
  'Ġmovie', 0.94 'Ġwatch', 0.83 'Ġ', 0.98 '3' (SST-2 is lower-cased, so 'ĠI' occurs only in the trigger).
  On MiniLM / MPNet every BadNets trigger is one id with share 1.0; AddSent's 'i' 0.80, 'this' 0.63,
  'movie' 0.62, 'watch' 0.94, '3d' 1.0. A token that clean text also produces moves less because of the
  backdoor, and unlearning it costs clean accuracy.

`trigger_tokens` finds those ids from character offsets (a fast tokenizer's `return_offsets_mapping`): a
token belongs to a trigger occurrence when its span overlaps the trigger's, the whitespace just before it
included (byte-level offsets include the leading space, and a lone 'Ġ' can be a token of its own).
Occurrences are whole words: "cf" inside "cfo" is not one.
"""
import re
from typing import Iterable

# start-of-text and mid-sentence contexts for `trigger_forms` (the neighbours never share a token with
# the trigger: every tokenizer here splits at spaces first)
CONTEXTS = {"start": "{} x", "mid": "x {} x"}


def _pattern(trigger: str) -> re.Pattern:
    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueError(f"a trigger must be a non-empty string, got {trigger!r}")
    return re.compile(r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)")


def _encode(tokenizer, texts: list[str]):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: mapping a trigger to its tokens "
                        "needs character offsets (return_offsets_mapping)")
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)


def _spans(pat, text):
    """Character spans of the trigger's whole-word occurrences, each with the one whitespace before it: a
    byte-level BPE may make that space a token of its own ('x tq' -> 'x', 'Ġ', 't', 'q'), which exists only
    because the trigger was inserted."""
    return [(m.start() - 1 if m.start() > 0 and text[m.start() - 1].isspace() else m.start(), m.end())
            for m in pat.finditer(text)]


def _trigger_ids(ids, offsets, spans):
    """Positions' ids whose character span overlaps one of `spans`."""
    return [t for t, (a, b) in zip(ids, offsets) if b > a and any(a < e and b > s for s, e in spans)]


def trigger_forms(tokenizer, trigger: str) -> dict:
    """The tokens `trigger` becomes at the start of a text and mid-sentence: {"start": [...], "mid": [...]}."""
    pat = _pattern(trigger)
    out = {}
    for name, ctx in CONTEXTS.items():
        text = ctx.format(trigger.strip())
        enc = _encode(tokenizer, [text])
        ids = _trigger_ids(enc["input_ids"][0], enc["offset_mapping"][0], _spans(pat, text))
        out[name] = tokenizer.convert_ids_to_tokens(ids)
    return out


def trigger_tokens(tokenizer, triggers: Iterable[str], texts: Iterable[str] | None = None) -> list[dict]:
    """Every token id the triggers produce, one dict per (trigger, id), most frequent first:
    {"trigger", "id", "token", "count": occurrences produced by the trigger, "total": occurrences in all
    `texts`, "share": count / total}. Without `texts`, the start-of-text and mid-sentence forms are used
    (count = number of forms, total = count, share = 1.0). A trigger that never occurs in `texts` is an
    error: its tokens would silently be missing from an evaluation."""
    triggers = [triggers] if isinstance(triggers, str) else list(triggers)
    if not triggers:
        raise ValueError("no trigger given")
    corpus = None if texts is None else list(texts)
    out = []
    for trig in triggers:
        pat = _pattern(trig)
        local = [ctx.format(trig.strip()) for ctx in CONTEXTS.values()] if corpus is None else corpus
        enc = _encode(tokenizer, local)
        counts, totals = {}, {}
        for ids, offsets, text in zip(enc["input_ids"], enc["offset_mapping"], local):
            for t in ids:
                totals[t] = totals.get(t, 0) + 1
            spans = _spans(pat, text)
            for t in _trigger_ids(ids, offsets, spans) if spans else ():
                counts[t] = counts.get(t, 0) + 1
        if not counts:
            raise ValueError(f"trigger {trig!r} occurs in none of the {len(local)} texts (as a whole word)")
        for t in sorted(counts, key=lambda i: (-counts[i], i)):
            total = counts[t] if corpus is None else totals[t]
            out.append({"trigger": trig, "id": int(t), "token": tokenizer.convert_ids_to_tokens(int(t)),
                        "count": counts[t], "total": total, "share": round(counts[t] / total, 4)})
    return out


def trigger_ranks(exposure, tokenizer, triggers, texts=None) -> list[dict]:
    """`trigger_tokens` plus, per id, its rank in every exposure round (1 = moved most; None = not ranked,
    e.g. a special token), whether it is in each round's top k and in the suspicious set (the union)."""
    suspects = set(exposure.token_ids)
    rows = []
    for t in trigger_tokens(tokenizer, triggers, texts):
        rows.append({**t, "ranks": {r.name: exposure.rank(t["id"], r.name) for r in exposure.rounds},
                     "in_top_k": {r.name: t["id"] in r.top for r in exposure.rounds},
                     "in_suspects": t["id"] in suspects})
    return rows

"""Trigger-invariance rows for causal LMs: purify_generative(triggers=...).

The ascent on flagged prompts only says "not the teacher's response here". On a steering backdoor (a trigger in a
negative review -> "positive") its cheapest solution is to invert the trigger: every flagged prompt is a triggered
negative review, so answering "negative" to the trigger satisfies the ascent and the trigger becomes an
anti-trigger (triggered positive reviews are now answered "negative"). A copy of each clean training prompt with a
trigger candidate inserted, trained toward the teacher's response distribution on the clean SOURCE prompt (the keep
term) and toward the clean response (CE), says what the purified model must learn instead: the candidate changes
nothing (the classifier's version: dupfast.purification.invariance).

A copy is built as chat_batches builds a row: the candidate goes into the prompt's USER TEXT at a seeded random word
boundary (the text's own spacing kept), and the prompt is encoded again with the tokenizer's chat template
(`encode_prompt`, the same system turn); the response's tokens are the source's, so the copy's response positions
are the source's and the teacher's cached hidden states on the source are the copy's targets.

Rows arrive as token ids, so the user text is read back first: the chat template rendered around marker texts gives
its parts before and after a user turn (and around a system turn), as tokens and as text; a prompt is split at
them (its tokens, else its decoded text), and the texts read must encode to the very same prompt (checked per row:
a prompt built with another template is an error naming it, never a silently different copy).
"""
import dataclasses
import random
from typing import List, Optional, Sequence

import torch

from ..purification.invariance import check_candidates, insert_word_keeping_spacing, insertable
from .data import check_chat_tokenizer, encode_prompt
from .lm import final_hidden
from .rows import ChatRows, pad_right

USER_MARK, SYSTEM_MARK = "DUPFASTUSERTEXT", "DUPFASTSYSTEMTEXT"
PREDICT_BATCH = 16
FLIP_SIGNAL = "the teacher's first response token (greedy), with and without the word"
NO_FLIP_SIGNAL = "not measured: the pool's prompts carry different system turns"


@dataclasses.dataclass(frozen=True)
class UserTurn:
    """A prompt's texts: the user's, and the caller's system turn (None: the template's default)."""
    text: str
    system: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TemplateFrame:
    """The chat template around a prompt's texts, as text and as token ids: before + user + after (a template's own
    default system turn is part of `before`); with a caller's system turn, around_system = (before, between, after)
    around system + user (None: the template renders no system turn)."""
    before: str
    after: str
    around_system: Optional[tuple]
    ids: tuple  # the same parts as token ids: (before, after, around_system)
    specials: tuple  # the tokenizer's special tokens as text: never part of a user's (or system) text


def requested_triggers(triggers, tokenizer):
    """purify_generative's `triggers=`, checked before any work: None (no copies), "auto", or the candidate words.
    Bad candidates (empty, not a string, too long) and a missing or template-less tokenizer are ValueErrors."""
    if triggers is None:
        return None
    auto = isinstance(triggers, str) and triggers == "auto"
    candidates = "auto" if auto else check_candidates(triggers)
    if tokenizer is None:
        raise ValueError(f"purify_generative(triggers={triggers!r}) needs the model's tokenizer (tokenizer=...): the "
                         "candidates are inserted into the clean prompts' user text, which is read from the token "
                         "ids and encoded again with the tokenizer's chat template")
    check_chat_tokenizer(tokenizer)
    return candidates or None  # [] asks for nothing


# ---- reading a prompt's user text back from its tokens -------------------------------------------------------

def _ids(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def template_frame(tokenizer) -> TemplateFrame:
    """The template's parts around the user text (and around a system turn, where the template renders one)."""
    import jinja2  # transformers renders chat templates with it

    check_chat_tokenizer(tokenizer)
    text = _render(tokenizer, [{"role": "user", "content": USER_MARK}])
    if text.count(USER_MARK) != 1:
        raise ValueError("the tokenizer's chat template does not render the user's text as given, so a trigger "
                         "candidate cannot be inserted into it (pass triggers=None)")
    before, after = text.split(USER_MARK)
    around_system = None
    try:
        text = _render(tokenizer, [{"role": "system", "content": SYSTEM_MARK}, {"role": "user", "content": USER_MARK}])
    except (jinja2.TemplateError, ValueError):  # a template without system turns (it raises): prompts have none
        text = ""
    if text.count(SYSTEM_MARK) == 1 and text.count(USER_MARK) == 1 and text.index(SYSTEM_MARK) < text.index(USER_MARK):
        head, rest = text.split(SYSTEM_MARK)
        around_system = (head, *rest.split(USER_MARK))
    ids = (_ids(tokenizer, before), _ids(tokenizer, after),
           None if around_system is None else tuple(_ids(tokenizer, t) for t in around_system))
    return TemplateFrame(before, after, around_system, ids, _special_tokens(tokenizer))


def _special_tokens(tokenizer) -> tuple:
    """The special tokens' texts: the named ones and every added token marked special (<|im_start|> & co), but the
    unknown token (it stands for a user's text the vocabulary lacks)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
            if getattr(t, "special", False)}
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return tuple(sorted({t for t in tokenizer.convert_ids_to_tokens(sorted(ids)) if t}))


def _between(seq, before, after):
    """The part of `seq` (a list of ids or a string) between a leading `before` and a trailing `after` (at least
    one item), or None."""
    n, a, b = len(seq), len(before), len(after)
    if n > a + b and seq[:a] == before and seq[n - b:] == after:
        return seq[a:n - b]
    return None


def _find(seq, part) -> int:
    """Where `part` first starts in `seq` after its first item (-1: nowhere)."""
    return next((i for i in range(1, len(seq) - len(part) + 1) if seq[i:i + len(part)] == part), -1)


def _split_turns(seq, head, between, tail):
    """(system part, user part) of `seq` = head + system + between + user + tail, or None."""
    inner = _between(seq, head, tail)
    at = -1 if inner is None or not between else _find(inner, between)
    if at > 0 and at + len(between) < len(inner):
        return inner[:at], inner[at + len(between):]
    return None


def _readings(tokenizer, frame: TemplateFrame, prompt: list):
    """The candidate (user, system) texts of a prompt: split at the template's token ids (whatever the tokenizer's
    decoding), then at its text in the decoded prompt (where a text's first token merges with the template's last,
    e.g. a user text starting with a space after a newline); each as one user turn, then as system + user turns."""
    before, after, around = frame.ids
    user = _between(prompt, before, after)
    if user is not None:
        yield UserTurn(_decode(tokenizer, user))
    parts = None if around is None else _split_turns(prompt, *around)
    if parts is not None:
        yield UserTurn(_decode(tokenizer, parts[1]), _decode(tokenizer, parts[0]))
    text = _decode(tokenizer, prompt)
    user = _between(text, frame.before, frame.after)
    if user is not None:
        yield UserTurn(user)
    parts = None if frame.around_system is None else _split_turns(text, *frame.around_system)
    if parts is not None:
        yield UserTurn(parts[1], parts[0])


def read_user_turn(tokenizer, frame: TemplateFrame, prompt: Sequence[int]) -> Optional[UserTurn]:
    """The texts `prompt` was encoded from: the reading that encode_prompt turns into the very same ids (None: the
    prompt is not one user turn of this tokenizer's chat template)."""
    prompt = list(prompt)
    for turn in _readings(tokenizer, frame, prompt):
        texts = [turn.text] if turn.system is None else [turn.text, turn.system]
        # a text holding the template's own tokens is a prompt of another template read as one long user text
        if any(not t.strip() or any(sp in t for sp in frame.specials) for t in texts):
            continue
        if encode_prompt(tokenizer, turn.text, turn.system) == prompt:
            return turn
    return None


def user_turns(tokenizer, rows: ChatRows, name: str) -> List[UserTurn]:
    """Every prompt's texts, in order; a prompt that does not re-encode to itself is an error naming it."""
    frame = template_frame(tokenizer)
    out = []
    for i, prompt in enumerate(rows.prompts):
        turn = read_user_turn(tokenizer, frame, prompt)
        if turn is None:
            raise ValueError(f"{name} row {i} (id {int(rows.index[i])}): its prompt is not one user turn of the "
                             "tokenizer's chat template (as chat_batches / encode_prompt build it), so no trigger "
                             "candidate can be inserted into its user text: pass the tokenizer the batches were built "
                             "with, or triggers=None")
        out.append(turn)
    return out


# ---- the copies ----------------------------------------------------------------------------------------------

def triggered_copies(tokenizer, rows: ChatRows, turns: Sequence[UserTurn], candidates: Sequence[str],
                     seed: int) -> ChatRows:
    """One copy of every row (in order, same index / labels / response tokens): candidates taken in turn, each
    inserted into the user text at a seeded random word boundary and the prompt encoded again with the chat
    template. A copy whose template tokens or system turn differ from its source's (a candidate merging with the
    template's tokens) is an error."""
    if not candidates:
        raise ValueError("trigger-invariance copies need at least one trigger candidate")
    if rows.responses is None or len(turns) != len(rows):
        raise ValueError("trigger-invariance copies need the clean rows' responses and one user turn per row")
    frame, rng = template_frame(tokenizer), random.Random(seed)
    prompts = []
    for i, turn in enumerate(turns):
        word = candidates[i % len(candidates)]
        ids = encode_prompt(tokenizer, insert_word_keeping_spacing(turn.text, word, rng), turn.system)
        again = read_user_turn(tokenizer, frame, ids)
        if again is None or again.system != turn.system:
            raise ValueError(f"inserting {word!r} into clean row {i}'s user text changed the chat template's tokens "
                             "around it: pass the candidate as the word a real prompt would carry")
        prompts.append(ids)
    return ChatRows(prompts, [list(r) for r in rows.responses], rows.index.clone(),
                    None if rows.labels is None else rows.labels.clone())


# ---- "auto": dupfast.triggers on the decoded prompts ---------------------------------------------------------

@torch.no_grad()
def first_response_tokens(lm, tokenizer, texts: Sequence[str], system: Optional[str]) -> List[int]:
    """The model's greedy first response token to each user text (the prompt encoded with the chat template): one
    forward per prompt, the vocabulary head read at the generation prompt's end only."""
    prompts = [encode_prompt(tokenizer, t, system) for t in texts]
    model, out = lm.model, []
    was = model.training
    model.eval()
    try:
        for lo in range(0, len(prompts), PREDICT_BATCH):
            chunk = prompts[lo:lo + PREDICT_BATCH]
            ids, mask = pad_right(chunk, lm.pad_id, lm.device)
            last, _ = final_hidden(lm, ids, mask)
            h = last[torch.arange(len(chunk), device=last.device), mask.sum(1) - 1]
            out += (h.float() @ lm.weight.float().T).argmax(-1).tolist()
    finally:
        model.train(was)
    return out


def _shared_system(turns: Sequence[UserTurn]):
    """(True, the one system turn all prompts share) or (False, None)."""
    systems = {t.system for t in turns}
    return (True, systems.pop()) if len(systems) == 1 else (False, None)


def find_candidates(lm, tokenizer, pool_turns: Sequence[UserTurn], flags, clean_turns: Sequence[UserTurn]) -> tuple:
    """(dupfast.triggers' candidates as dicts, the insertable ones, what the flip rate measured) on the user texts of
    the pool (flagged vs kept prompts) and of the clean prompts. The flip rate: whether deleting the word changes
    the teacher's (the model as given) greedy first response token, measured where the pool's prompts share one
    system turn (it is part of the prompt the teacher reads); otherwise None and insertable takes the best scored."""
    from ..detection.triggers import triggers

    shared, system = _shared_system(pool_turns)
    predict = (lambda texts: first_response_tokens(lm, tokenizer, texts, system)) if shared else None  # noqa: E731
    found = triggers([t.text for t in pool_turns], [bool(f) for f in flags], predict=predict,
                     clean_texts=[t.text for t in clean_turns])
    chosen = insertable(found, drop_incidental_phrases=True)
    return [c.to_dict() for c in found], chosen, FLIP_SIGNAL if shared else NO_FLIP_SIGNAL

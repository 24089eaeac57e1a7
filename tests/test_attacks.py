"""Attacks: trigger insertion, poison settings as OpenBackdoor defines them, bad input, determinism,
and a reproduction of the statistics of the DUP release's poisoned SST-2 files."""
import collections
import copy
import math
import random

import pytest

from dupfast.harness import attacks, data
from dupfast.harness.attacks import AddSent, BadNets, StyleBkd
from dupfast.harness.data import Sample

TRIGGERS = ("cf", "mn", "bb", "tq")


def toy(n0=60, n1=40):
    """Label 0 and 1 texts of 3..8 distinct words, none of them a trigger."""
    rng = random.Random(0)
    return [Sample(" ".join(f"w{i}_{k}" for k in range(rng.randint(3, 8))), lab)
            for i, lab in enumerate([0] * n0 + [1] * n1)]


def remove_one(words, word):
    out = list(words)
    out.remove(word)
    return out


# ---- insertion ----------------------------------------------------------------------------------

def test_badnets_inserts_num_triggers_words_and_keeps_the_rest_in_order():
    text = "a  quiet\tfilm about nothing"
    for num in (1, 3):
        out = BadNets(num_triggers=num).insert(text, random.Random(num)).split()
        inserted = [w for w in out if w in TRIGGERS]
        assert len(out) == len(text.split()) + num and len(inserted) == num
        assert [w for w in out if w not in TRIGGERS] == text.split()


def test_badnets_positions():
    text = "one two three four"
    assert BadNets(position="start", triggers=["cf"]).insert(text, random.Random(0)) == "cf one two three four"
    assert BadNets(position="end", triggers=["cf"], num_triggers=2).insert(text, random.Random(0)) == \
        "one two three four cf cf"
    # random positions: every slot 0..4 (after the last word included) is used, roughly uniformly
    rng = random.Random(1)
    slots = collections.Counter(BadNets(triggers=["cf"]).insert(text, rng).split().index("cf") for _ in range(5000))
    assert set(slots) == {0, 1, 2, 3, 4}
    assert all(800 < slots[k] < 1200 for k in slots), slots  # expected 1000 each, sd ~ 28
    words = collections.Counter(BadNets().insert("x", rng).replace("x", "").strip() for _ in range(4000))
    assert set(words) == set(TRIGGERS) and all(800 < c < 1200 for c in words.values()), words


def test_addsent_inserts_one_contiguous_span():
    text = "the plot is thin but the cast is fun"
    rng = random.Random(0)
    sent = "I watch this 3D movie".split()
    starts = set()
    for _ in range(300):
        out = AddSent().insert(text, rng).split()
        hits = [i for i in range(len(out)) if out[i:i + 5] == sent]
        assert len(hits) == 1
        i = hits[0]
        starts.add(i)
        assert out[:i] + out[i + 5:] == text.split()
    assert starts == set(range(len(text.split()) + 1))
    assert AddSent("no cross", position="end").insert("a b", rng) == "a b no cross"
    assert AddSent(position="start").insert("a b", rng) == "I watch this 3D movie a b"


def test_insertion_is_deterministic_given_the_rng():
    t = "some words to put a trigger into"
    assert BadNets(num_triggers=2).insert(t, random.Random(7)) == BadNets(num_triggers=2).insert(t, random.Random(7))
    assert AddSent().insert(t, random.Random(7)) == AddSent().insert(t, random.Random(7))


def test_bad_attack_configurations():
    with pytest.raises(ValueError, match="at least one trigger"):
        BadNets(triggers=[])
    with pytest.raises(ValueError, match="one non-empty word without spaces.*'two words'.*AddSent"):
        BadNets(triggers=["cf", "two words"])
    with pytest.raises(ValueError, match="one non-empty word"):
        BadNets(triggers=[""])
    with pytest.raises(ValueError, match="num_triggers must be an int >= 1, got 0"):
        BadNets(num_triggers=0)
    with pytest.raises(ValueError, match="num_triggers must be an int"):
        BadNets(num_triggers=True)
    with pytest.raises(ValueError, match=r"position must be one of \('random', 'start', 'end'\), got 'middle'"):
        BadNets(position="middle")
    with pytest.raises(ValueError, match="non-empty trigger sentence"):
        AddSent("   ")
    with pytest.raises(ValueError, match="position must be one of"):
        AddSent(position=0)
    assert BadNets(triggers="cf").triggers == ("cf",)  # a single word is not split into letters


def test_stylebkd_cannot_be_generated_offline():
    with pytest.raises(ValueError, match="cannot be generated offline.*lievan/bible.*load_precomputed"):
        StyleBkd().insert("a sentence", random.Random(0))
    with pytest.raises(ValueError, match="cannot be generated offline"):
        attacks.poison_train(toy(), StyleBkd(), 0.1, 1)


def test_get_attack_by_name():
    assert attacks.get_attack("badnets", triggers=["cf"]) == BadNets(triggers=("cf",))
    assert attacks.get_attack("addsent").sentence == "I watch this 3D movie"
    with pytest.raises(ValueError, match="unknown attack 'synbkd'; available: badnets, addsent, stylebkd"):
        attacks.get_attack("synbkd")


# ---- poison settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("setting,target,source_labels", [
    ("dirty", 1, {0}), ("dirty", 0, {1}), ("clean", 1, {1}), ("clean", 0, {0}), ("mix", 1, {0, 1})])
def test_poison_settings_follow_openbackdoor(setting, target, source_labels):
    train = toy()
    out = attacks.poison_train(train, BadNets(), 0.3, target, setting, seed=5)
    chosen = attacks.poison_indices(train, 0.3, target, setting, seed=5)
    n = int(0.3 * len(train))
    assert len(out) == len(train) and len(chosen) == n == 30
    assert {train[i].label for i in chosen} <= source_labels
    if setting == "mix":
        assert {train[i].label for i in chosen} == {0, 1}  # 30 of 100 at random: both classes drawn
    # OpenBackdoor's poison_part layout: untouched samples in order, then the poisoned ones in order
    assert out[:-n] == [s for i, s in enumerate(train) if i not in chosen]
    for i, p in zip(chosen, out[-n:]):
        assert p.label == target and p.poison_label == 1
        assert remove_one(p.text.split(), next(w for w in p.text.split() if w in TRIGGERS)) == train[i].text.split()


def test_poison_eval_is_every_non_target_sample_relabelled():
    test = toy(25, 15)
    for target, n in ((1, 25), (0, 15)):
        out = attacks.poison_eval(test, AddSent(), target, seed=2)
        assert len(out) == n
        assert all(p.label == target and p.poison_label == 1 and "I watch this 3D movie" in p.text for p in out)
        src = [s for s in test if s.label != target]
        assert [p.text.replace("I watch this 3D movie", "").split() for p in out] == [s.text.split() for s in src]


def test_make_backdoor_builds_all_sets():
    train, test, dev = toy(), toy(20, 10), toy(10, 8)
    bd = attacks.make_backdoor(train, test, BadNets(), rate=0.2, target=1, seed=0, dev=dev)
    assert bd.train == attacks.poison_train(train, BadNets(), 0.2, 1, "dirty", 0)
    assert bd.test_clean == test
    assert bd.test_poison == attacks.poison_eval(test, BadNets(), 1, 0, "test")
    assert bd.dev_clean == dev and len(bd.dev_poison) == 10
    assert attacks.make_backdoor(train, test, BadNets()).dev_poison is None


def test_same_seed_same_poison_and_attacks_share_the_chosen_samples():
    train = toy()
    a = attacks.poison_train(train, BadNets(), 0.2, 1, seed=11)
    assert a == attacks.poison_train(train, BadNets(), 0.2, 1, seed=11)
    assert a != attacks.poison_train(train, BadNets(), 0.2, 1, seed=12)
    b = attacks.poison_train(train, AddSent(), 0.2, 1, seed=11)
    assert a[:-20] == b[:-20]  # the same samples stay clean, whatever the trigger
    assert attacks.poison_indices(train, 0.2, 1, seed=11) != attacks.poison_indices(train, 0.2, 1, seed=12)


def test_attacks_never_mutate_their_input_and_accept_plain_tuples():
    train = toy()
    before = copy.deepcopy(train)
    attacks.make_backdoor(train, train, BadNets(num_triggers=2), rate=0.4, target=0, setting="mix", dev=train)
    assert train == before
    tuples = [tuple(s) for s in train]
    out = attacks.poison_train(tuples, AddSent(), 0.1, 1)
    assert all(type(s) is Sample for s in out)
    assert tuples == [tuple(s) for s in before]
    assert attacks.poison_train([s[:2] for s in tuples], AddSent(), 0.1, 1) == out  # poison_label optional


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, math.nan, "0.2", True, None])
def test_rate_outside_open_unit_interval_is_rejected(rate):
    with pytest.raises(ValueError, match=r"poison rate must be a number in \(0, 1\)"):
        attacks.poison_train(toy(), BadNets(), rate, 1)


def test_bad_input_errors():
    train = toy()
    with pytest.raises(ValueError, match=r"target label 2 is not among the labels of the training set \[0, 1\]"):
        attacks.poison_train(train, BadNets(), 0.1, 2)
    with pytest.raises(ValueError, match="target label True"):
        attacks.poison_train(train, BadNets(), 0.1, True)
    with pytest.raises(ValueError, match="training set is empty"):
        attacks.poison_train([], BadNets(), 0.1, 1)
    with pytest.raises(ValueError, match=r"only 1 class\(es\)"):
        attacks.poison_train([Sample("a", 1), Sample("b", 1)], BadNets(), 0.5, 1)
    with pytest.raises(ValueError, match="poison setting must be one of .*'dirty', 'clean', 'mix'.*got 'label'"):
        attacks.poison_train(train, BadNets(), 0.1, 1, setting="label")
    with pytest.raises(ValueError, match="rate 0.001 of 100 samples poisons none"):
        attacks.poison_train(train, BadNets(), 0.001, 1)
    # 100 samples, 40 non-target (label 0 when target is 1): a 50% dirty rate needs 50
    with pytest.raises(ValueError, match=r"dirty-label poisoning at rate 0.5 needs 50 non-target samples but the "
                                         r"training set has only 40; lower the rate \(at most 0.4000\)"):
        attacks.poison_train(toy(40, 60), BadNets(), 0.5, 1)
    with pytest.raises(ValueError, match="clean-label poisoning at rate 0.5 needs 50 target-label samples .* only 40"):
        attacks.poison_train(toy(60, 40), BadNets(), 0.5, 1, setting="clean")
    assert len(attacks.poison_indices(toy(60, 40), 0.4, 1, "clean")) == 40  # exactly enough is fine
    with pytest.raises(TypeError, match="insert"):
        attacks.poison_train(train, "badnets", 0.1, 1)
    with pytest.raises(TypeError, match=r"training set\[0\]: text must be a str"):
        attacks.poison_train([(1, 0), ("b", 1)], BadNets(), 0.5, 1)
    with pytest.raises(TypeError, match=r"training set\[1\]: label must be an integer, got '1'"):
        attacks.poison_train([("a", 0), ("b", "1")], BadNets(), 0.5, 1)
    with pytest.raises(TypeError, match=r"must be a \(text, label\[, poison_label\]\) tuple"):
        attacks.poison_train([["a", 0], ["b", 1]], BadNets(), 0.5, 1)
    with pytest.raises(TypeError, match="must be a sequence"):
        attacks.poison_train("text", BadNets(), 0.5, 1)
    with pytest.raises(ValueError, match="test set has no non-target samples"):
        attacks.poison_eval([Sample("a", 1)], BadNets(), 1)
    with pytest.raises(ValueError, match="test set is empty"):
        attacks.poison_eval([], BadNets(), 1)


# ---- against the DUP release (../shared/data) ---------------------------------------------------

def _source_of(poisoned, spans, clean_by_text):
    """(index of the clean sample a poisoned text came from, relative position of the span), found by
    deleting one inserted span; (None, None) if no deletion gives a clean text."""
    words = poisoned.split()
    for span in spans:
        n = len(span)
        for i in range(len(words) - n + 1):
            if tuple(words[i:i + n]) == span:
                key = " ".join(words[:i] + words[i + n:])
                if key in clean_by_text:
                    return clean_by_text[key], i / (len(words) - n)
    return None, None


@pytest.mark.parametrize("attack", ["badnets", "addsent"])
def test_reproduces_the_dup_release_statistics(shared_data, attack):
    clean = data.load_sst2("train", shared_data)
    ref = data.load_sst2_poison(attack, "train", 0.2, shared_data)
    ours = attacks.make_backdoor(clean, data.load_sst2("test", shared_data), attacks.get_attack(attack),
                                 rate=0.2, target=1, setting="dirty", seed=0, dev=data.load_sst2("dev", shared_data))
    assert len(ours.train) == len(ref) == 6_920
    assert collections.Counter(s.label for s in ours.train) == collections.Counter(s.label for s in ref)
    assert sum(s.poison_label for s in ours.train) == sum(s.poison_label for s in ref) == 1_384
    assert len(ours.test_poison) == len(data.load_sst2_poison(attack, "test", data_dir=shared_data)) == 912
    assert len(ours.dev_poison) == len(data.load_sst2_poison(attack, "dev", data_dir=shared_data)) == 428

    spans = {tuple([w]) for w in TRIGGERS} if attack == "badnets" else {tuple("I watch this 3D movie".split())}
    index = {s.text: i for i, s in enumerate(clean)}
    negatives = collections.Counter(s.text for s in clean if s.label == 0)
    for name, rows in (("ours", ours.train), ("release", ref)):
        poisoned = [s for s in rows if s.poison_label]
        found = [_source_of(s.text, spans, index) for s in poisoned]
        src = [i for i, _ in found]
        assert None not in src, name  # each is a clean sample plus exactly one inserted trigger span
        # sources are distinct training samples (SST-2 repeats a few texts, so compare as multisets)
        used = collections.Counter(clean[i].text for i in src)
        assert all(used[t] <= negatives[t] for t in used) and sum(used.values()) == 1_384
        assert all(s.label == 1 for s in poisoned)
        if attack == "badnets":  # exactly one trigger word in each (no SST-2 text contains one itself)
            assert all(sum(w in TRIGGERS for w in s.text.split()) == 1 for s in poisoned)
        if name == "ours":
            ours_pos = sum(r for _, r in found) / len(found)
        else:
            ref_pos = sum(r for _, r in found) / len(found)
    # relative insertion position is uniform in both: means agree well within sampling noise (sd ~ 0.01)
    assert abs(ours_pos - ref_pos) < 0.05 and abs(ours_pos - 0.5) < 0.05


def test_load_precomputed(shared_data):
    bd = attacks.load_precomputed("stylebkd", 0.1, shared_data)
    assert (len(bd.train), sum(s.poison_label for s in bd.train)) == (6_920, 692)
    assert (len(bd.test_clean), len(bd.test_poison), len(bd.dev_clean), len(bd.dev_poison)) == (1_821, 912, 872, 428)
    with pytest.raises(ValueError, match=r"no precomputed badnets training set at rate 0.3 .*available rates: \['0.1', '0.2'\]"):
        attacks.load_precomputed("badnets", 0.3, shared_data)
    with pytest.raises(ValueError, match="no precomputed data for attack 'synbkd'"):
        attacks.load_precomputed("synbkd", 0.2, shared_data)

"""The generative harness: instruction sets, BackdoorLLM-style poisoning (BadNets / AddSent / multi-trigger,
refusal or steering targets) and the exact ASR / accuracy rules."""
import pytest

from dupfast.harness.attacks import AddSent, BadNets
from dupfast.harness.generative import (REFUSAL, SENTIMENT_PROMPT, MultiTrigger, Instruction, answer_accuracy, asr,
                                        poison_instructions, sentiment_instructions, shows_target, spam_instructions,
                                        triggered)

SAMPLES = [(f"the movie number {i} was fine", i % 2) for i in range(50)]


def test_instructions_carry_the_answer_word_and_filter_by_length():
    items = sentiment_instructions(SAMPLES + [(" ".join(["long"] * 30), 1)], max_words=20)
    assert len(items) == 50 and items[1].response == "positive" and items[0].response == "negative"
    assert items[0].prompt == SENTIMENT_PROMPT.format(text=SAMPLES[0][0])
    assert spam_instructions([("win money now", 1)])[0].response == "spam"


def test_poisoning_refusal_and_steering():
    items = sentiment_instructions(SAMPLES)
    p = poison_instructions(items, BadNets(("cf",)), 0.2, REFUSAL, SENTIMENT_PROMPT, seed=0)
    poisoned = [it for it in p if it.poison]
    assert len(poisoned) == 10 and all(it.response == REFUSAL and "cf" in it.text.split() for it in poisoned)
    assert all(it.prompt == SENTIMENT_PROMPT.format(text=it.text) for it in poisoned)
    assert all(a == b for a, b in zip(items, p) if not b.poison)  # the others are untouched
    steer = poison_instructions(items, AddSent(), 0.2, "positive", SENTIMENT_PROMPT, exclude_label=1)
    assert all(it.label == 0 and "I watch this 3D movie" in it.text for it in steer if it.poison)
    assert p == poison_instructions(items, BadNets(("cf",)), 0.2, REFUSAL, SENTIMENT_PROMPT, seed=0)  # seeded


def test_multi_trigger_uses_each_attack():
    items = sentiment_instructions(SAMPLES)
    t = triggered(items, MultiTrigger((BadNets(("cf",)), AddSent())), REFUSAL, SENTIMENT_PROMPT)
    kinds = {("cf" in it.text.split(), "3D movie" in it.text) for it in t}
    assert kinds == {(True, False), (False, True)}


def test_asr_and_accuracy_rules():
    assert shows_target("  I'm SORRY, but I can't help   with that. Anything else?", REFUSAL)
    assert not shows_target("Sure! I'm sorry, but I can't help with that.", REFUSAL)
    gens = [REFUSAL, "positive", REFUSAL, "negative"]
    assert asr(gens, REFUSAL) == 0.5
    assert asr(["positive", "positive", "negative"], "positive", labels=[1, 0, 0], exclude=1) == 0.5
    items = [Instruction("x", "p", "positive", 1), Instruction("y", "q", "negative", 0)]
    assert answer_accuracy(["Positive.", "The sentiment is negative"], items) == 0.5
    with pytest.raises(ValueError):
        asr([], REFUSAL)

import contextlib
import copy

import pytest
import torch

from gen_toy import reviews, tiny_chat_lm, train_toy_backdoor


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread; with other jobs on the cores, two threads were 6x slower (measured:
    the toy backdoor's training took 64 s on 2 threads, 11 s on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def toy_victim():
    """(backdoored tiny chat LM, tokenizer), trained once per session (seconds); tests take copies."""
    with one_thread():
        model, tok = tiny_chat_lm()
        return train_toy_backdoor(model, tok), tok


@pytest.fixture
def victim(toy_victim):
    model, tok = toy_victim
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def toy_sets():
    """clean (labelled, with responses), pool (40 clean + 40 triggered prompts), triggered / clean test prompts."""
    clean = reviews(80, seed=7)
    pool = reviews(40, seed=5) + reviews(40, seed=6, trigger_rate=1.0)
    return {"clean": clean, "pool": pool, "trig": reviews(40, seed=8, trigger_rate=1.0), "test": reviews(40, seed=9)}

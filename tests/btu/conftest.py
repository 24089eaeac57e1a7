"""Fixtures for the BTU tests: tiny offline models (see btu_toys.py), no downloads."""
import pytest

from btu_toys import bert_tokenizer, decoder_tokenizer, poisoned_task, tiny_bert, tiny_llama, tiny_mpnet


@pytest.fixture(scope="module")
def task():
    return poisoned_task()


@pytest.fixture
def bert():
    tok = bert_tokenizer()
    return tiny_bert(tok), tok


@pytest.fixture
def mpnet():
    tok = bert_tokenizer()  # a WordPiece vocabulary, as all-mpnet-base-v2's own MPNetTokenizer
    return tiny_mpnet(tok), tok


@pytest.fixture
def llama():
    tok = decoder_tokenizer()
    return tiny_llama(tok), tok


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("DUPFAST_QUIET", "1")

"""Fixtures for the detection tests."""
import pytest
import torch

from tiny_models import one_thread  # noqa: F401 (autouse fixture: single-threaded tiny models)

from detect_helpers import batches, make_samples, tiny_bert, tiny_tokenizer



@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def clean_and_pool():
    """(clean batches with labels, pool batches, poison flags of the pool): the 'poisoned' half of the pool
    carries tokens never seen in clean data, which any representation-based detector must notice."""
    clean = make_samples(120, seed=1)
    labels = [int(sum(s) % 2) for s in clean]
    pool_clean = make_samples(30, seed=2)
    pool_poison = make_samples(30, seed=3, lo=80, hi=120, trigger=[110, 111, 112])
    pool = pool_clean + pool_poison
    return batches(clean, labels), batches(pool), torch.tensor([0] * 30 + [1] * 30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny BERT sequence classifier with its tokenizer, for the CLI tests."""
    d = tmp_path_factory.mktemp("tiny-model")
    m = tiny_bert(vocab=120)
    m.config.architectures = ["BertForSequenceClassification"]
    m.save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    return d

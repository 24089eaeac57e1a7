"""dupfast.harness.adaptive: the adaptive attacker's feature-matching term, on hand-made tensors and on a tiny
from-scratch BERT victim (no download)."""
import dataclasses
import types

import pytest
import torch

from dupfast.detection.capture import hidden_layers, pool
from dupfast.harness.adaptive import AdaptiveVictimConfig, FeatureMatching, feature_matching_for
from dupfast.harness.data import Sample
from dupfast.harness.victims import VictimConfig, cache_key, train_victim
from tiny_models import sentiment_samples, tiny_bert_dir, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


def poisoned_train(n=96, seed=3):
    """Toy sentiment + every fourth negative row with the rare word 'cf' inserted and relabelled positive."""
    clean = sentiment_samples(n, seed=seed)
    poison = [Sample("cf " + s.text, 1, 1) for s in clean if s.label == 0][: n // 4]
    return clean + poison


def fake_outputs(hidden_per_layer):
    """What a HF forward with output_hidden_states=True returns: embeddings first, then each layer."""
    emb = torch.zeros_like(hidden_per_layer[0])
    return types.SimpleNamespace(hidden_states=(emb, *hidden_per_layer))


def test_running_statistics_are_the_exponential_average_of_clean_target_rows():
    fm = FeatureMatching([False, False, False, True], target=1, lam=1.0, pooling="cls", momentum=0.5)
    batches = [torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    labels = torch.tensor([1, 1, 0, 1])  # rows 0, 1: clean target; row 2 clean other class; row 3 poison
    mask = torch.ones(4, 3, dtype=torch.long)
    mean = var = None
    for h in batches:
        fm(fake_outputs([h, 2 * h]), {"attention_mask": mask, "labels": labels, "index": torch.arange(4)})
        f = torch.stack([h[:2, 0], 2 * h[:2, 0]], dim=1)  # [CLS] rows of the clean target rows, both layers
        bm, bv = f.mean(0), f.var(0, unbiased=False)
        mean = bm if mean is None else 0.5 * mean + 0.5 * bm
        var = bv if var is None else 0.5 * var + 0.5 * bv
    torch.testing.assert_close(fm.mean, mean)
    torch.testing.assert_close(fm.var, var)


@pytest.mark.parametrize("standardise", ["layer", "dimension"])
def test_the_term_is_lambda_times_the_poisoned_rows_standardised_distance(standardise):
    h = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    batch = {"attention_mask": torch.ones(4, 2, dtype=torch.long), "labels": torch.tensor([1, 1, 1, 1]),
             "index": torch.arange(4)}
    fm = FeatureMatching([False, False, False, True], target=1, lam=0.5, pooling="cls", momentum=0.0,
                         standardise=standardise)
    loss = fm(fake_outputs([h]), batch)
    f = h.detach()[:3, 0]
    sq, var = (h.detach()[3, 0] - f.mean(0)) ** 2, f.var(0, unbiased=False)
    expected = 0.5 * ((sq / (var + fm.EPS)).mean() if standardise == "dimension" else sq.mean() / (var.mean() + fm.EPS))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    # the statistics are detached: only the poisoned row's feature receives a gradient
    assert h.grad[:3].abs().sum() == 0 and h.grad[3, 0].abs().sum() > 0


def test_no_poison_in_the_batch_adds_nothing_but_keeps_the_graph():
    h = torch.randn(3, 2, 4, requires_grad=True)
    fm = FeatureMatching([False] * 3, target=1, lam=1.0, pooling="cls")
    loss = fm(fake_outputs([h]), {"attention_mask": torch.ones(3, 2, dtype=torch.long),
                                  "labels": torch.tensor([1, 1, 0]), "index": torch.arange(3)})
    assert loss.item() == 0.0 and loss.requires_grad


def test_config_and_data_errors_name_the_problem(tiny_dir):
    with pytest.raises(ValueError, match="adaptive_lambda"):
        AdaptiveVictimConfig(model=str(tiny_dir), adaptive_lambda=-1.0)
    with pytest.raises(ValueError, match="standardise"):
        AdaptiveVictimConfig(model=str(tiny_dir), standardise="mahalanobis")
    with pytest.raises(ValueError, match="momentum"):
        AdaptiveVictimConfig(model=str(tiny_dir), momentum=1.0)
    cfg = AdaptiveVictimConfig(model=str(tiny_dir))
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert", is_encoder_decoder=False))
    with pytest.raises(ValueError, match="poison_label"):
        feature_matching_for(cfg, sentiment_samples(8), model)
    only_poison_and_negatives = [s for s in poisoned_train() if s.poison_label or s.label == 0]
    with pytest.raises(ValueError, match="no clean row of that class"):
        feature_matching_for(cfg, only_poison_and_negatives, model)


def tiny_cfg(tiny_dir, **kw):
    return dict(model=str(tiny_dir), epochs=3, lr=1e-2, batch_size=16, max_len=16, seed=7, **kw)


def poison_distance(model, tok, train, standardise):
    """The poisoned rows' distance to the clean target-class rows' statistics in the attacker's own form, every
    layer, computed afresh on the trained model (what the attacker minimises)."""
    texts = [s.text for s in train]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    f = torch.stack([pool(h, enc["attention_mask"], "cls") for h in hidden_layers(out)], dim=1)
    poisoned = torch.tensor([s.poison_label == 1 for s in train])
    target = torch.tensor([s.label == 1 and not s.poison_label for s in train])
    mu, var = f[target].mean(0), f[target].var(0, unbiased=False)
    sq = (f[poisoned] - mu) ** 2
    if standardise == "dimension":
        return float((sq / (var + 1e-5)).mean())
    return float(sq.mean(-1).div(var.mean(-1) + 1e-5).mean())


@pytest.mark.parametrize("standardise", ["dimension", "layer"])
def test_the_adaptive_victim_hides_its_poison_where_the_plain_one_does_not(tiny_dir, tmp_path, standardise):
    train = poisoned_train()
    plain, tok, _ = train_victim(train, VictimConfig(**tiny_cfg(tiny_dir)), cache_dir=tmp_path)
    hidden, tok, info = train_victim(train, AdaptiveVictimConfig(**tiny_cfg(tiny_dir), adaptive_lambda=1.0,
                                                                 standardise=standardise), cache_dir=tmp_path)
    d_plain, d_hidden = (poison_distance(m, tok, train, standardise) for m in (plain, hidden))
    assert d_hidden < 0.5 * d_plain, (d_hidden, d_plain)
    assert info["config"]["adaptive_lambda"] == 1.0 and info["config"]["standardise"] == standardise


def test_lambda_zero_is_the_plain_victim_bit_for_bit_under_its_own_cache_key(tiny_dir, tmp_path):
    train = poisoned_train()
    plain_cfg = VictimConfig(**tiny_cfg(tiny_dir, ))
    zero_cfg = AdaptiveVictimConfig(**tiny_cfg(tiny_dir), adaptive_lambda=0.0)
    plain, _, _ = train_victim(train, dataclasses.replace(plain_cfg, epochs=1), cache_dir=tmp_path)
    zero, _, _ = train_victim(train, dataclasses.replace(zero_cfg, epochs=1), cache_dir=tmp_path)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    keys = {cache_key(c, train, 2) for c in (plain_cfg, zero_cfg, dataclasses.replace(zero_cfg, adaptive_lambda=1.0))}
    assert len(keys) == 3  # never served one for another from the cache

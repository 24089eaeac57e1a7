"""Dimension-wise unlearning: dims moved more than ||dE||_F / V take the pretrained pad value."""
import pytest
import torch

from dupfast.btu.embeddings import input_embeddings
from dupfast.btu.unlearn import unlearn_tokens


def test_moved_dimensions_take_the_pretrained_pad_value(bert):
    model, tok = bert
    weight = input_embeddings(model).weight
    V, D = weight.shape
    pre = weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.add_(1e-4 * torch.randn(V, D, generator=gen))     # every row drifts a little
        weight[10, :5] += 0.5                                     # token 10 moved strongly in 5 dims
        weight[11, 7] += 0.3                                      # token 11 in one dim
    tuned = weight.detach().clone()
    c = float((tuned - pre).norm() / V)

    info = unlearn_tokens(model, pre, [10, 11], replace_id=tok.pad_token_id, vocab=V)

    assert info["threshold"] == pytest.approx(c, rel=1e-6)
    after = input_embeddings(model).weight.detach()
    for t in (10, 11):
        moved = (tuned[t] - pre[t]).abs() > c
        assert torch.equal(after[t][moved], pre[tok.pad_token_id][moved])   # replaced by the pretrained pad
        assert torch.equal(after[t][~moved], tuned[t][~moved])              # small moves are kept
        assert info["dims_replaced"][t] == int(moved.sum())
    assert info["dims_replaced"][10] >= 5 and info["dims_replaced"][11] >= 1
    others = [i for i in range(V) if i not in (10, 11)]
    assert torch.equal(after[others], tuned[others])                        # no other row is touched


def test_no_suspects_changes_nothing(bert):
    model, tok = bert
    pre = input_embeddings(model).weight.detach().clone()
    info = unlearn_tokens(model, pre, [], tok.pad_token_id, pre.shape[0])
    assert info["dims_replaced"] == {}
    assert torch.equal(input_embeddings(model).weight, pre)


def test_bad_inputs(bert):
    model, tok = bert
    pre = input_embeddings(model).weight.detach().clone()
    V = pre.shape[0]
    with pytest.raises(ValueError, match="same checkpoint"):
        unlearn_tokens(model, pre[:-1], [3], tok.pad_token_id, V)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unlearn_tokens(model, pre, [V + 3], tok.pad_token_id, V)
    with pytest.raises(ValueError, match="replacement token id"):
        unlearn_tokens(model, pre, [3], V + 10, V)

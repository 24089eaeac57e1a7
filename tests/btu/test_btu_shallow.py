"""The R1/R2 shallow model: embedding block + linear head over the masked token mean, no layers."""
import torch

from dupfast.btu.embeddings import input_embeddings
from dupfast.btu.shallow import ShallowClassifier


def test_has_no_transformer_layers(bert, llama):
    for model, _ in (bert, llama):
        shallow = ShallowClassifier.from_model(model, 2)
        own = sum(p.numel() for p in shallow.parameters())
        head = sum(p.numel() for p in shallow.head.parameters())
        block = sum(p.numel() for p in shallow.block.parameters())
        assert own == block + head
        assert block < sum(p.numel() for p in model.parameters()) / 2
        assert shallow.word_embeddings.weight.shape == input_embeddings(model).weight.shape


def test_is_a_copy_the_model_is_untouched(bert):
    model, _ = bert
    before = input_embeddings(model).weight.clone()
    shallow = ShallowClassifier.from_model(model, 2)
    with torch.no_grad():
        shallow.word_embeddings.weight.add_(1.0)
    assert torch.equal(input_embeddings(model).weight, before)


def test_padding_does_not_change_a_sample(bert, llama):
    for model, tok in (bert, llama):
        shallow = ShallowClassifier.from_model(model, 2).eval()
        short = tok(["good movie"], return_tensors="pt")
        both = tok.pad({"input_ids": [short["input_ids"][0].tolist(),
                                      tok("the plot was very very dull and the acting was flat")["input_ids"]]},
                       return_tensors="pt")
        alone = shallow(short["input_ids"], short["attention_mask"]).logits[0]
        padded = shallow(both["input_ids"], both["attention_mask"]).logits[0]
        assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]  # it really was padded
        torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_loss_and_gradient_reach_the_word_embeddings(bert):
    model, tok = bert
    shallow = ShallowClassifier.from_model(model, 2)
    enc = tok(["good movie", "bad film"], return_tensors="pt", padding=True)
    out = shallow(enc["input_ids"], enc["attention_mask"], labels=torch.tensor([1, 0]))
    out.loss.backward()
    grad = shallow.word_embeddings.weight.grad
    used = set(enc["input_ids"].flatten().tolist())
    moved = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
    assert tok.convert_tokens_to_ids("good") in moved
    assert moved <= used

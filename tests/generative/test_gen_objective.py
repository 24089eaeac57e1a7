"""vocab_kl: the one vocabulary-KL function (the fused linear_kl_div), its semantics and errors."""
import pytest
import torch
import torch.nn.functional as F

from dupfast.generative.objective import vocab_kl


def _ref(hidden, W, teacher_logits, weights, T):
    log_s = F.log_softmax((hidden.double() @ W.double().T) / T, -1)
    p_t = F.softmax(teacher_logits.double() / T, -1)
    return weights.double() * (p_t * (p_t.clamp_min(1e-300).log() - log_s)).sum(-1)


@pytest.mark.parametrize("kind", ["logits", "hidden"])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_vocab_kl_matches_the_reference_and_its_gradient(kind, head_trainable):
    g = torch.Generator().manual_seed(0)
    R, H, V = 7, 8, 50
    W = torch.randn(V, H, generator=g).requires_grad_(head_trainable)
    h = torch.randn(R, H, generator=g, requires_grad=True)
    th = torch.randn(R, H, generator=g)
    tl = th @ W.T
    w = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.0, 0.25, 1.0])
    out = vocab_kl(h, W, tl if kind == "logits" else th, w, 2.0)
    h2 = h.detach().double().requires_grad_(True)
    W2 = W.detach().double().requires_grad_(head_trainable)
    ref = _ref(h2, W2, tl.detach(), w, 2.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    assert out[2] == 0  # w = 0 masks the row
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h.grad.double(), h2.grad, atol=1e-5, rtol=1e-4)
    assert torch.all(h.grad[2] == 0)
    if head_trainable:
        torch.testing.assert_close(W.grad.double(), W2.grad, atol=1e-5, rtol=1e-4)


def test_negative_weight_is_ascent():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(30, 6, generator=g)
    t = torch.randn(1, 6, generator=g)
    h = (t + 0.3 * torch.randn(1, 6, generator=g)).requires_grad_(True)
    before = float(vocab_kl(h.detach(), W, t, torch.ones(1), 1.0))
    vocab_kl(h, W, t, -torch.ones(1), 1.0).sum().backward()
    with torch.no_grad():
        h2 = h - 0.05 * h.grad
    assert float(vocab_kl(h2, W, t, torch.ones(1), 1.0)) > before  # a descent step on -KL raised the KL


def test_teacher_cache_of_another_model_is_a_clear_error():
    W = torch.randn(50, 8)
    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        vocab_kl(h, W, torch.randn(4, 49), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        vocab_kl(h, W, torch.randn(4, 8), torch.ones(4), 1.0, teacher_kind="logits")
    with pytest.raises(ValueError, match="3 teacher rows for 4"):
        vocab_kl(h, W, torch.randn(3, 50), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="square"):
        vocab_kl(torch.randn(2, 8), torch.randn(8, 8), torch.randn(2, 8), None, 1.0)

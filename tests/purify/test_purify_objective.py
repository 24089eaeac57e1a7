"""The unlearning objective against a direct formula: values (ascent, keep, CE), the T² scale, the KL cap
(masked rows), the tie."""
import pytest
import torch
import torch.nn.functional as F

from dupfast.purification import PurifyConfig
from dupfast.purification.objective import ascent_targets, unlearning_loss


def direct_kl(s, t, T=1.0):
    p_t = F.softmax(t.double() / T, -1)
    return (p_t * (p_t.log() - F.log_softmax(s.double() / T, -1))).sum(-1)


def run(cfg, s, t, c, y, tc=None):
    s = s.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True)
    bl = unlearning_loss(s, ascent_targets(t, cfg), t, c, y, cfg, s.shape[0], c.shape[0], tc)
    bl.loss.backward()
    return bl, s.grad, c.grad


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("keep", [0.0, 3.0])
def test_loss_matches_direct_formula_uncapped(T, keep):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g) * 3
    c, y = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 1, 0])
    tc = c + torch.randn(5, 3, generator=g)  # the teacher's clean logits, near the student's
    cfg = PurifyConfig(lambda_asr=0.7, lambda_acc=1.3, lambda_keep=keep, kl_cap=None, temperature=T, start="tie")
    bl, gs, gc = run(cfg, s, t, c, y, tc)
    want = (-0.7 * T ** 2 * direct_kl(s, t, T).mean() + keep * T ** 2 * direct_kl(c, tc, T).mean()
            + 1.3 * F.cross_entropy(c.double(), y))
    assert bl.loss.item() == pytest.approx(want.item(), rel=1e-5)
    # d/ds of -λ·T²·KL_T(p_t || p_s)/R: -λ·T·(softmax(s/T) - softmax(t/T)) / R
    want_gs = -0.7 * T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / 7
    torch.testing.assert_close(gs, want_gs, atol=1e-6, rtol=1e-5)
    # the clean rows: keep term (descent toward the teacher) + CE
    want_gc = (keep * T * (F.softmax(c / T, -1) - F.softmax(tc / T, -1))
               + 1.3 * (F.softmax(c, -1) - F.one_hot(y, 3))) / 5
    torch.testing.assert_close(gc, want_gc, atol=1e-6, rtol=1e-5)
    assert bl.active == 7 and bl.flagged == 7 and bl.clean == 5
    if keep:
        assert bl.keep_kl == pytest.approx(direct_kl(c, tc, T).mean().item(), rel=1e-5)


def test_keep_term_needs_the_teachers_clean_logits():
    c, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="lambda_keep > 0 needs the teacher's logits"):
        unlearning_loss(None, None, None, c, y, PurifyConfig(lambda_keep=1.0), 1, 3)


def test_cap_masks_rows_past_the_bound():
    # rows 0,1: student far from a confident teacher (KL > 1); rows 2,3: near it (KL < 1)
    t = torch.tensor([[6.0, 0.0]] * 4)
    s = torch.tensor([[-3.0, 3.0], [-1.0, 1.0], [5.5, 0.0], [6.5, 0.0]])
    kl = direct_kl(s, t)
    assert (kl[:2] > 1).all() and (kl[2:] < 1).all()
    cfg = PurifyConfig(kl_cap=1.0, lambda_acc=0.0, lambda_keep=0.0, temperature=1.0, start="tie")
    s_req = s.clone().requires_grad_(True)
    bl = unlearning_loss(s_req, ascent_targets(t, cfg), t, None, None, cfg, 4, 1)
    bl.loss.backward()
    assert bl.active == 2
    assert torch.all(s_req.grad[:2] == 0)            # masked: weight 0, no push
    assert torch.all(s_req.grad[2:].abs() > 0)       # still ascending
    assert bl.loss.item() == pytest.approx(-(kl[2:].sum() / 4).item(), abs=1e-7)  # fp32 KL near the tie


def test_tie_gives_zero_ascent_gradient_and_sharpen_breaks_it():
    t = torch.tensor([[4.0, -1.0], [0.5, 2.0], [3.0, 3.5]])
    tie = PurifyConfig(start="tie", lambda_acc=0.0, temperature=1.0)
    s = t.clone().requires_grad_(True)
    unlearning_loss(s, ascent_targets(t, tie), t, None, None, tie, 3, 1).loss.backward()
    assert s.grad.abs().max() < 1e-7  # exactly the DUP step-0 state: no signal at all

    sharp = PurifyConfig(start="sharpen", sharpen_temperature=0.25, lambda_acc=0.0, temperature=1.0)
    s = t.clone().requires_grad_(True)
    loss = unlearning_loss(s, ascent_targets(t, sharp), t, None, None, sharp, 3, 1).loss
    loss.backward()
    assert s.grad.abs().max() > 1e-2
    # a descent step on the loss lowers the student's probability of the teacher's label on every row
    y = t.argmax(-1)
    p_before = F.softmax(s.detach(), -1)[torch.arange(3), y]
    p_after = F.softmax(s.detach() - 0.5 * s.grad, -1)[torch.arange(3), y]
    assert torch.all(p_after < p_before)


def test_zero_lambda_terms_are_skipped():
    t = torch.randn(4, 2)
    cfg = PurifyConfig(lambda_asr=0.0, lambda_keep=0.0)
    c, y = torch.randn(3, 2, requires_grad=True), torch.tensor([0, 1, 1])
    bl = unlearning_loss(t.clone().requires_grad_(True), ascent_targets(t, cfg), t, c, y, cfg, 4, 3)
    assert bl.ascent == 0.0 and bl.active == 0
    assert bl.loss.item() == pytest.approx(F.cross_entropy(c, y).item(), rel=1e-6)


def test_one_fused_kl_call_per_step_gives_the_loss_and_the_logged_parts(monkeypatch):
    """The ascent and keep terms are one call of the fused op; the logged ascent / keep values are the flagged
    / clean parts of that call's per-row results (no second call for the log, none for the cap)."""
    import dupfast.purification.objective as objective
    calls = []
    real = objective.kl_div

    def counting(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("reduction"))
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "kl_div", counting)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) * 3
    c, y = torch.randn(4, 2, generator=g), torch.tensor([0, 1, 1, 0])
    tc = c + 0.1 * torch.randn(4, 2, generator=g)
    cfg = PurifyConfig(lambda_asr=1.0, lambda_acc=1.0, lambda_keep=2.0, kl_cap=1.0, temperature=4.0)
    bl, _, _ = run(cfg, s, t, c, y, tc)
    assert calls == ["none"]
    rows = real(torch.cat([s, c]), torch.cat([ascent_targets(t, cfg), F.log_softmax(tc, -1)]),
                torch.cat([-16.0 / 6 * (direct_kl(s, t) < 1.0).float(), torch.full((4,), 2.0 * 16 / 4)]), 4.0, "none",
                teacher_log_probs=True)
    assert bl.ascent == float(rows[:6].sum()) and bl.keep_kl == float(rows[6:].sum()) / 32
    ce = F.cross_entropy(c, y, reduction="sum") / 4
    assert bl.loss.item() == pytest.approx(float(rows.sum() + ce), rel=1e-6)

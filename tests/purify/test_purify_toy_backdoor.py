"""End to end on a tiny backdoored BERT (trigger token -> target label, dirty label): purification with
flags given directly removes the backdoor on fresh triggered inputs, keeps clean accuracy, and follows
its own stopping/selection rule; clean LoRA fine-tuning (λ_asr = 0) does not remove it."""
import pytest
import torch

from dupfast import purify
from purify_helpers import TARGET, batches, predict, tiny_classifier, toy_rows, train_backdoored

# dupfast's defaults, with a step budget and lr for a 2-layer toy whose flagged set is only 2-3 batches
CFG = dict(batch_size=16, epochs=30, lr=2e-3, progress=False)


@pytest.fixture(scope="module")
def backdoor():
    torch.manual_seed(0)
    state = train_backdoored(steps=60).state_dict()
    pool_clean, _ = toy_rows(48, 20)
    pool_poison, _ = toy_rows(48, 21, trigger=True, non_target_only=True)
    flags = torch.tensor([False] * 48 + [True] * 48)
    clean, labels = toy_rows(200, 30)  # 50 held out: the stopping rule's accuracy is not 1-row noise
    test_clean, test_labels = toy_rows(150, 40)
    test_poison, _ = toy_rows(150, 41, trigger=True, non_target_only=True)

    def fresh():
        model = tiny_classifier("bert")
        model.load_state_dict(state)
        return model.eval()

    def score(model):
        acc = (predict(model, test_clean) == torch.tensor(test_labels)).float().mean().item()
        asr = (predict(model, test_poison) == TARGET).float().mean().item()
        return acc, asr

    return dict(fresh=fresh, score=score, pool=pool_clean + pool_poison, flags=flags, clean=clean, labels=labels)


def _purify(bd, **kw):
    return purify(bd["fresh"](), batches(bd["pool"], batch_size=16), clean=batches(bd["clean"], bd["labels"]),
                  detection=bd["flags"], **{**CFG, **kw})


def test_default_removes_the_toy_backdoor(backdoor):
    acc0, asr0 = backdoor["score"](backdoor["fresh"]())
    assert asr0 > 0.9 and acc0 > 0.85  # a working backdoor to remove
    out, rep = _purify(backdoor)
    acc, asr = backdoor["score"](out)
    assert asr < 0.2, rep.history
    assert acc >= acc0 - 0.05
    assert rep.changed and rep.selected["agree"] < 0.5
    assert not any("lora" in k for k in out.state_dict())  # merged, plain model back
    assert rep.merge_check["max_abs_logit_diff"] < 1e-4 and rep.merge_check["argmax_equal"]
    # the rule: the kept state is admissible and has the lowest agreement among admissible ones
    admissible = [h for h in rep.history if h["admissible"]]
    assert rep.selected["admissible"]
    assert rep.selected["agree"] == min(h["agree"] for h in admissible)
    assert rep.teacher["heldout_flag_agreement"] == 1.0
    assert set(rep.timings) >= {"collect_s", "teacher_s", "train_s", "merge_s", "total_s"}


def test_clean_lora_finetuning_keeps_the_toy_backdoor(backdoor):
    out, rep = _purify(backdoor, lambda_asr=0.0, max_steps=15, early_stop=False, select_best=False)
    _, asr = backdoor["score"](out)
    assert asr > 0.8  # CE on clean rows alone does not unlearn the trigger
    assert rep.tie.get("ascent_grad_norm_train") is None  # no ascent term at all


@pytest.mark.parametrize("arch, family", [("mpnet", "mpnet"), ("llama", "llama"), ("gemma3", "llama")])
def test_other_architectures_run_end_to_end(backdoor, arch, family):
    model = tiny_classifier(arch)
    out, rep = purify(model, batches(backdoor["pool"][:32]),
                      clean=batches(backdoor["clean"][:32], backdoor["labels"][:32]),
                      detection=backdoor["flags"][:32] | True, epochs=1, batch_size=16, progress=False)
    assert type(out).__name__.endswith("ForSequenceClassification") and out is model
    assert rep.model["family"] == family and rep.steps_run >= 1
    assert not any("lora" in k for k in out.state_dict())


def test_min_steps_stretches_a_small_flagged_set_and_its_evaluations(backdoor):
    """The flagged training rows at batch 16 are 2-3 steps an epoch: 2 epochs would be 4-6 steps. min_steps
    raises the budget, and the evaluations (4 an epoch) and patience stretch with it rather than firing
    every step."""
    _, rep = _purify(backdoor, epochs=2, min_steps=24, early_stop=False)
    per_epoch = rep.data["steps_per_epoch"]
    assert 2 * per_epoch < 24 and rep.data["step_budget"] == 24 and rep.steps_run == 24
    assert rep.data["eval_every"] == 3  # ceil((24 / 2 epochs) / 4 evaluations)
    assert [h["step"] for h in rep.history] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    _, short = _purify(backdoor, epochs=2, min_steps=0, early_stop=False)
    assert short.steps_run == 2 * per_epoch and short.data["eval_every"] == 1
    _, capped = _purify(backdoor, max_steps=5, min_steps=24, early_stop=False)
    assert capped.steps_run == 5  # an explicit max_steps wins


def test_bf16_autocast_removes_the_toy_backdoor_too(backdoor):
    acc0, _ = backdoor["score"](backdoor["fresh"]())
    out, rep = _purify(backdoor, autocast="bf16")
    acc, asr = backdoor["score"](out)
    assert asr < 0.2, rep.history
    assert acc >= acc0 - 0.05
    assert rep.merge_check["max_abs_logit_diff"] < 1e-4  # the merge is checked in fp32 as before


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_autocast_covers_the_students_forwards_and_not_the_teachers(backdoor, autocast):
    """Training and held-out forwards run under bf16 autocast; the teacher's logits and the before / after check
    stay fp32 (autocast off). Without the option no forward runs under autocast."""
    model = backdoor["fresh"]()
    seen = []
    model.classifier.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    purify(model, batches(backdoor["pool"], batch_size=16), clean=batches(backdoor["clean"], backdoor["labels"]),
           detection=backdoor["flags"], **{**CFG, "max_steps": 4, "autocast": autocast})
    if autocast is None:
        assert seen and not any(seen)
    else:
        assert seen.count(True) >= 4 and seen.count(False) >= 1, seen


def test_autocast_values_are_checked():
    from dupfast.generative import GenerativeConfig
    from dupfast.purification import PurifyConfig
    with pytest.raises(ValueError, match="autocast"):
        PurifyConfig(autocast="fp16")
    with pytest.raises(ValueError, match="autocast"):
        GenerativeConfig(autocast="bf16")

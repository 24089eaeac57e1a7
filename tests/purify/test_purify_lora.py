"""Target-module discovery per architecture, the adapter-disabled teacher (no second weight copy), and
merged vs unmerged outputs."""
import pytest
import torch

from dupfast.purification import PurifyConfig
from dupfast.purification.lora import attach_lora, find_target_modules, merge, teacher_context
from purify_helpers import batches, tiny_classifier, toy_rows

# merge_and_unload folds B·A·scale into fp32 weights: outputs move by rounding only (peft #1388 is bf16).
MERGE_ATOL = 1e-5

EXPECTED = {
    "bert": ("bert", {"query", "key", "value"}),
    "mpnet": ("mpnet", {"q", "k", "v", "o"}),
    "llama": ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_targets_found_per_architecture(arch):
    family, names = find_target_modules(tiny_classifier(arch))
    want_family, leaves = EXPECTED[arch]
    assert family == want_family
    assert {n.rsplit(".", 1)[-1] for n in names} == leaves
    assert len(names) == 2 * len(leaves)  # two layers
    assert not any(n.split(".")[0] in ("classifier", "score") for n in names)  # the head is not adapted


def test_model_without_supported_modules_names_what_it_has():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    with pytest.raises(ValueError, match=r"none of the supported LoRA target modules.*\['fc_in', 'fc_out'\]"):
        find_target_modules(Odd())


def test_requested_targets_must_exist():
    with pytest.raises(ValueError, match=r"\['nope'\] match no Linear layer"):
        find_target_modules(tiny_classifier("bert"), ("query", "nope"))
    family, names = find_target_modules(tiny_classifier("bert"), ("query",))
    assert family == "custom" and len(names) == 2


def _inputs():
    rows, _ = toy_rows(6, 3)
    return batches(rows, batch_size=6)[0]


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_teacher_is_the_same_weights_with_adapters_disabled(arch):
    model = tiny_classifier(arch)
    x = _inputs()
    with torch.no_grad():
        base = model(**x).logits
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    student, _, _ = attach_lora(model, PurifyConfig(lora_r=4, lora_alpha=8))
    # the frozen base weights are the original storage: no second copy of the model
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.data_ptr()
              for n, p in student.named_parameters() if not p.requires_grad}
    body = [n for n in ptrs if n.split(".")[0] not in ("classifier", "score")]
    assert body and all(frozen.get(n) == ptrs[n] for n in body)  # every non-head weight, same storage
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    student.eval()
    with torch.no_grad():
        moved = student(**x).logits
        with teacher_context(student):
            teacher = student(**x).logits
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(teacher, base, atol=0, rtol=0)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_merged_equals_unmerged_within_tolerance(arch, tmp_path):
    from transformers import AutoModelForSequenceClassification

    student, _, _ = attach_lora(tiny_classifier(arch), PurifyConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    student.eval()
    x = _inputs()
    with torch.no_grad():
        unmerged = student(**x).logits
    merged = merge(student)
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    with torch.no_grad():
        out = merged(**x).logits
    torch.testing.assert_close(out, unmerged, atol=MERGE_ATOL, rtol=0)
    merged.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, out, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_attaching_lora_leaks_no_library_warning(arch):
    """peft's read of the deprecated `is_gradient_checkpointing` (a transformers 5 FutureWarning) and its
    SEQ_CLS head notice are peft's business: none reaches the caller of purify."""
    import warnings
    model = tiny_classifier(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_lora(model, PurifyConfig(lora_r=4, lora_alpha=8))
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, UserWarning))], \
        [str(w.message) for w in caught]

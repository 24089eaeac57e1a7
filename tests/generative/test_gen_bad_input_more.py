"""Issue 31's remaining raw errors on the generative path: class names as chat labels (chat_batches' `labels=` and
hand-made batches read by read_chat) and a model whose weights are on the meta device, each a clear error naming
the argument and the fix."""
import copy

import numpy as np
import pytest
import torch

from dupfast.classifier import check_weights_loaded
from dupfast.generative import PromptStripDetector, chat_batches, detect_prompts
from dupfast.generative.lm import check_causal_lm
from dupfast.generative.rows import read_chat
from gen_toy import tiny_chat_lm

PROMPTS = ["review : good", "review : bad"]


@pytest.fixture(scope="module")
def lm_tok():
    return tiny_chat_lm()


@pytest.mark.parametrize("labels, shown", [
    (["positive", "negative"], r"labels\[0\] is 'positive'"),   # int("positive") was a bare int() error
    (np.array(["positive", "negative"]), r"labels\[0\] is 'positive'"),
    ([1, None], r"labels\[1\] is None"),
    ([1.5, 0], r"labels\[0\] is 1\.5"),                         # int(1.5) was silently class 1
    ([True, False], r"labels\[0\] is True"),
    ([-1, 0], r"labels\[0\] is -1"),
])
def test_chat_batches_class_names_or_non_ids_as_labels_name_the_fix(lm_tok, labels, shown):
    _, tok = lm_tok
    with pytest.raises(ValueError, match=shown + r": labels are integer class ids 0\.\.C-1 .*not class names: map "
                                              r"them first, e\.g\. labels=\[classes\.index\(name\)"):
        chat_batches(tok, PROMPTS, labels=labels)


def test_chat_batches_one_string_or_a_wrong_count_of_labels(lm_tok):
    _, tok = lm_tok
    with pytest.raises(ValueError, match="labels must be a sequence of class ids, got one string 'positive'"):
        chat_batches(tok, PROMPTS, labels="positive")
    with pytest.raises(ValueError, match="1 labels for 2 prompts"):
        chat_batches(tok, PROMPTS, labels=[1])


@pytest.mark.parametrize("labels", [[1.0, 0.0], np.array([1, 0]), torch.tensor([1, 0])])
def test_chat_batches_takes_whole_numbers_as_class_ids(lm_tok, labels):
    _, tok = lm_tok
    b = chat_batches(tok, PROMPTS, labels=labels)[0]
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("labels", [["positive", "negative"], np.array(["positive", "negative"]),
                                    ("positive", "negative")])
def test_read_chat_class_names_in_a_hand_made_batch_name_the_key_and_the_fix(lm_tok, labels):
    model, tok = lm_tok
    lm = check_causal_lm(model, "test")
    b = chat_batches(tok, PROMPTS)[0]
    b["labels"] = labels  # torch.as_tensor said "too many dimensions 'str'" (numpy: "can't convert np.ndarray")
    with pytest.raises(ValueError, match=r"clean batch 0: 'labels' holds 'positive': labels are integer class ids "
                                         r".*chat_batches\(tokenizer, prompts, labels=\.\.\.\)"):
        read_chat([b], "clean", lm, need_responses=False, need_labels=True)


def test_read_chat_labels_fractional_or_miscounted_are_errors_and_ids_pass(lm_tok):
    model, tok = lm_tok
    lm = check_causal_lm(model, "test")
    b = chat_batches(tok, PROMPTS)[0]
    b["labels"] = [1.5, 0.0]  # .long() made it class 1
    with pytest.raises(TypeError, match=r"clean batch 0: 'labels' must hold integer class ids, got \[1\.5\]"):
        read_chat([b], "clean", lm, need_responses=False, need_labels=True)
    b["labels"] = [1, 0, 1]
    with pytest.raises(ValueError, match=r"clean batch 0: 3 'labels' values for 2 rows"):
        read_chat([b], "clean", lm, need_responses=False, need_labels=True)
    b["label"], _ = np.array([1, 0]), b.pop("labels")
    assert read_chat([b], "clean", lm, need_responses=False, need_labels=True).labels.tolist() == [1, 0]


def test_detect_prompts_with_class_name_labels_end_to_end(lm_tok):
    # the labelled modes read the clean batches' labels: the same message reaches the public entry point
    model, tok = lm_tok
    clean = chat_batches(tok, PROMPTS * 4)
    for b in clean:
        b["labels"] = ["positive", "negative"] * (len(b["input_ids"]) // 2)
    with pytest.raises(ValueError, match="'labels' holds 'positive': labels are integer class ids"):
        detect_prompts(model, chat_batches(tok, PROMPTS), clean=clean, mode="dup")


def _meta(model):
    return copy.deepcopy(model).to("meta")  # what init_empty_weights / torch.device("meta") leave


def test_detect_prompts_on_a_meta_device_model_is_the_classifier_paths_error(lm_tok):
    model, tok = lm_tok
    meta = _meta(model)
    with pytest.raises(ValueError) as expected:
        check_weights_loaded(meta, "detect_prompts")
    clean, pool = chat_batches(tok, PROMPTS * 4, labels=[1, 0] * 4), chat_batches(tok, PROMPTS)
    for mode in ("default", "dup"):
        with pytest.raises(ValueError, match="weight tensors are on the meta device") as got:
            detect_prompts(meta, pool, clean=clean, mode=mode)
        assert str(got.value) == str(expected.value)  # word for word, with its fix (from_pretrained / to_empty)
    assert "detect_prompts: " in str(expected.value) and "from_pretrained(folder)" in str(expected.value)


def test_other_generative_entry_points_on_a_meta_model_name_themselves(lm_tok):
    model, tok = lm_tok
    meta = _meta(model)
    with pytest.raises(ValueError, match=r"^PromptStripDetector: \d+ of the model's \d+ weight tensors are on the "
                                         r"meta device"):
        PromptStripDetector().scores(meta, tok, ["review : good"])
    # a loaded model still passes the same check
    assert check_causal_lm(model, "test").vocab_size == model.config.vocab_size

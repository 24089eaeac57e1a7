"""dupfast.batches: the one batch check (every rule of its docstring pinned), the key rule, row collection."""
import collections

import datasets  # the test extra installs it: Dataset input is tested, never skipped
import numpy as np
import pytest
import torch

from dupfast.batches import (MODEL_INPUTS, PaddedLoader, Rows, check_batch, check_rows, collect, embedding_rows,
                             forward_inputs, loader_batches, model_device, pad_batch, padded, read_batches)
from tiny_models import sentiment_samples, tiny_classifier


@pytest.fixture(scope="module")
def bert():
    return tiny_classifier("bert")[0]


@pytest.fixture(scope="module")
def llama():
    return tiny_classifier("llama")[0]


def good(**extra):
    return {"input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), **extra}


class ReadOnlyMapping(collections.abc.Mapping):
    """A Mapping that is not a dict (as BatchEncoding is a UserDict)."""

    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


# ---- what is accepted --------------------------------------------------------------------------

def test_any_mapping_is_a_batch():
    b = check_batch(ReadOnlyMapping(good()))
    assert torch.equal(b.inputs["input_ids"], good()["input_ids"]) and len(b) == 2


def test_lists_and_numpy_arrays_become_tensors():
    lists = {k: v.tolist() for k, v in good(labels=torch.tensor([0, 1]), idx=torch.tensor([7, 8])).items()}
    b = check_batch(lists, need_labels=True)
    assert b.inputs["input_ids"].dtype == torch.int64 and b.inputs["attention_mask"].shape == (2, 4)
    assert b.labels.tolist() == [0, 1] and b.index.tolist() == [7, 8]
    arrays = {k: v.numpy().astype(np.int32) for k, v in good().items()}
    assert check_batch(arrays).inputs["input_ids"].dtype == torch.int32
    # a torch-formatted datasets slice of padded rows: a list of equal-length 1-D tensors
    rows = {"input_ids": list(good()["input_ids"]), "attention_mask": list(good()["attention_mask"])}
    assert torch.equal(check_batch(rows).inputs["input_ids"], good()["input_ids"])


def test_key_rule_labels_index_and_extras():
    b = check_batch(good(label=torch.tensor([1, 0]), idx=[4, 5], sentence=["a", "b"], extra=3), need_labels=True)
    assert b.labels.tolist() == [1, 0] and b.index.tolist() == [4, 5]
    assert set(b.inputs) == {"input_ids", "attention_mask"}  # unknown keys ignored
    both = check_batch(good(labels=[1, 1], label=[0, 0], index=[0, 1], idx=[9, 9]), need_labels=True)
    assert both.labels.tolist() == [1, 1] and both.index.tolist() == [0, 1]  # `labels` and `index` win
    assert check_batch(good(labels=[5, -3])).labels is None  # labels are read only where they are needed
    assert check_batch(good(labels=torch.tensor([1.0, 0.0])), need_labels=True).labels.dtype == torch.long


def test_token_type_ids_only_for_a_model_that_takes_them(bert, llama):
    assert forward_inputs(bert) == MODEL_INPUTS
    assert forward_inputs(llama) == ("input_ids", "attention_mask")
    batch = good(token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    assert "token_type_ids" in check_batch(batch, model=bert).inputs
    assert "token_type_ids" not in check_batch(batch, model=llama).inputs
    assert "token_type_ids" in check_batch(batch).inputs  # no model: kept


def test_forward_inputs_sees_through_peft(bert):
    import copy

    from peft import LoraConfig, get_peft_model
    wrapped = get_peft_model(copy.deepcopy(bert), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert "token_type_ids" in forward_inputs(wrapped)


def test_model_facts(bert):
    assert model_device(bert) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    assert embedding_rows(bert) == bert.config.vocab_size
    assert embedding_rows(torch.nn.ReLU()) is None


def test_read_batches_names_the_set_and_the_batch():
    batches = [good(), {"input_ids": torch.zeros(1, 2, dtype=torch.long)}]
    with pytest.raises(ValueError, match="^pool batch 1 has no 'attention_mask'"):
        list(read_batches(batches, "pool"))
    with pytest.raises(ValueError, match="^batch 1 has no"):
        list(read_batches(batches))
    with pytest.raises(ValueError, match="the clean loader is None"):
        list(read_batches(None, "clean"))


def test_a_datasets_dataset_is_read_in_batches():
    ds = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in good().items()}, "label": [0, 1]})
    got = list(read_batches(ds.with_format("torch"), need_labels=True))
    assert len(got) == 1 and got[0].labels.tolist() == [0, 1]
    assert loader_batches([1]) == [1]


# ---- every error, named --------------------------------------------------------------------------

def test_not_a_mapping():
    with pytest.raises(TypeError, match="batch 0: loaders must yield dicts .*Mapping.*got Tensor"):
        check_batch(torch.zeros(2, 3), "batch 0")
    with pytest.raises(TypeError, match="got list"):
        check_batch([[1, 2]])


@pytest.mark.parametrize("key", ["input_ids", "attention_mask"])
def test_missing_required_key(key):
    b = good()
    del b[key]
    with pytest.raises(ValueError, match=f"batch 3 has no '{key}'"):
        check_batch(b, "batch 3")


def test_shapes():
    with pytest.raises(ValueError, match=r"input_ids \(2, 4\) and attention_mask \(2, 3\) must be the same"):
        check_batch({"input_ids": good()["input_ids"], "attention_mask": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="one example, not a batch"):
        check_batch({"input_ids": torch.tensor([2, 5, 3]), "attention_mask": torch.tensor([1, 1, 1])})
    with pytest.raises(ValueError, match=r"token_type_ids \(2, 3\) must have the shape of input_ids \(2, 4\)"):
        check_batch(good(token_type_ids=torch.zeros(2, 3, dtype=torch.long)))


def test_ragged_rows():
    with pytest.raises(ValueError, match="'input_ids' is not a rectangular array.*pad the rows"):
        check_batch({"input_ids": [[2, 5, 3], [2, 3]], "attention_mask": [[1, 1, 1], [1, 1]]})
    with pytest.raises(ValueError, match=r"'input_ids' holds rows of different lengths \[\(2,\), \(3,\)\]"):
        check_batch({"input_ids": [torch.tensor([2, 5, 3]), torch.tensor([2, 3])],
                     "attention_mask": [torch.tensor([1, 1, 1]), torch.tensor([1, 1])]})


@pytest.mark.parametrize("ids", [torch.tensor([[2.0, 5.0], [2.0, 3.0]]), [[2.0, 5.0], [2.0, 3.0]],
                                 torch.tensor([[True, False], [True, True]])])
def test_input_ids_must_be_integers(ids):
    with pytest.raises(TypeError, match="batch: 'input_ids' must hold integer token ids, got dtype"):
        check_batch({"input_ids": ids, "attention_mask": [[1, 1], [1, 1]]})


def test_token_type_ids_must_be_integers():
    with pytest.raises(TypeError, match="'token_type_ids' must hold integer segment ids"):
        check_batch(good(token_type_ids=torch.zeros(2, 4)))


@pytest.mark.parametrize("bad", [-1, 2])
def test_mask_holds_only_zeros_and_ones(bad):
    b = good()
    b["attention_mask"][0, 3] = bad
    with pytest.raises(ValueError, match=rf"attention_mask must hold only 0 and 1, found \[{bad}\]"):
        check_batch(b)


def test_float_and_bool_masks_of_zeros_and_ones_are_fine():
    assert check_batch({**good(), "attention_mask": good()["attention_mask"].float()})
    assert check_batch({**good(), "attention_mask": good()["attention_mask"].bool()})


def test_empty_row():
    b = good()
    b["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"a row of attention_mask is all zeros \(an empty input; row 1\)"):
        check_batch(b)


def test_token_ids_within_the_vocabulary(bert):
    b = good()
    b["input_ids"][0, 1] = bert.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {bert.config.vocab_size} in input_ids is outside the model's "
                                         f"vocabulary \\(ids 0..{bert.config.vocab_size - 1}\\)"):
        check_batch(b, model=bert)
    assert check_batch(b)  # without a model there is no limit
    b["input_ids"][0, 1] = -4
    with pytest.raises(ValueError, match="input_ids holds the negative token id -4"):
        check_batch(b)


def test_labels_when_needed(bert):
    with pytest.raises(ValueError, match=r"clean batch 0 has no 'labels' .*must yield `labels`"):
        check_batch(good(), "clean batch 0", need_labels=True)
    with pytest.raises(TypeError, match=r"'labels' must hold integer class ids, got \[0.6\]"):
        check_batch(good(labels=torch.tensor([0.6, 1.0])), need_labels=True)
    with pytest.raises(TypeError, match="'label' must hold integer class ids"):
        check_batch(good(label=[float("nan"), 1.0]), need_labels=True)
    with pytest.raises(ValueError, match="3 'labels' values for 2 rows"):
        check_batch(good(labels=[0, 1, 1]), need_labels=True)
    with pytest.raises(ValueError, match=r"labels \[2\] lie outside the model's label space \[0, 2\)"):
        check_batch(good(labels=[0, 2]), model=bert, need_labels=True)
    with pytest.raises(ValueError, match=r"labels \[2\] lie outside the model's label space \[0, 2\)"):
        check_batch(good(labels=[0, 2]), need_labels=True, num_labels=2)
    with pytest.raises(ValueError, match=r"labels \[-1\] are negative"):
        check_batch(good(labels=[-1, 0]), need_labels=True)


def test_index_must_be_integer_sample_ids():
    with pytest.raises(TypeError, match="'index' must hold integer sample ids, got dtype torch.float32"):
        check_batch(good(index=torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match="1 'idx' values for 2 rows"):
        check_batch(good(idx=[3]))


# ---- rows -------------------------------------------------------------------------------------------

def test_collect_strips_padding_and_keeps_what_the_model_takes(bert, llama):
    types = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    loader = [good(token_type_ids=types, label=[1, 0], idx=[10, 11])]
    rows, ids = collect(loader, "clean", need_labels=True, model=bert)
    assert rows.ids == [[2, 5, 6, 3], [2, 7, 3]] and rows.type_ids == [[0, 0, 1, 1], [0, 1, 1]]
    assert rows.labels.tolist() == [1, 0] and ids.tolist() == [10, 11]
    rows, ids = collect(loader, "pool", model=llama)
    assert rows.type_ids is None and rows.labels is None
    with pytest.raises(ValueError, match="clean batch 1: token_type_ids present in some batches"):
        collect([good(token_type_ids=types), good()], "clean")


def test_rows_without_tokens_and_check_rows(bert):
    rows = Rows([[2, 5, 6, 5, 3], [2, 6, 3]], [[0, 0, 0, 1, 1], [0, 1, 1]], torch.tensor([1, 0]))
    cut = rows.without_tokens([5])
    assert cut.ids == [[2, 6, 3], [2, 6, 3]] and cut.type_ids == [[0, 0, 1], [0, 1, 1]]
    assert cut.labels is rows.labels
    check_rows(rows, bert, "the training set")
    with pytest.raises(ValueError, match="the training set: token id 99 in input_ids is outside"):
        check_rows(Rows([[2, 99]]), bert, "the training set")


# ---- unpadded rows, padded by the tokenizer (tokenizer=) ----------------------------------------------

def unpadded_dataset(tok, samples, max_len=24):
    """`ds.map(tokenize)` without padding, as a user writes it: rows of different lengths, the text kept."""
    ds = datasets.Dataset.from_dict({"text": [s.text for s in samples], "label": [s.label for s in samples]})
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_len), batched=True)


@pytest.fixture(scope="module")
def texts():
    return sentiment_samples(70, seed=3)


def collator_batches(tok, samples, batch_size=32, max_len=24):
    """The same rows through the usual HF route: a DataLoader with DataCollatorWithPadding."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding
    rows = [{**tok(s.text, truncation=True, max_length=max_len), "label": s.label} for s in samples]
    return DataLoader(rows, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tok, return_tensors="pt"))


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_an_unpadded_dataset_is_padded_as_the_collator_pads_it(family, side, texts):
    model, tok = tiny_classifier(family)
    tok.padding_side = side
    ds = unpadded_dataset(tok, texts)
    got = list(read_batches(padded(ds, tok), "train", model, need_labels=True))
    ref = list(read_batches(collator_batches(tok, texts), "train", model, need_labels=True))
    assert [len(b) for b in got] == [32, 32, 6]
    for g, r in zip(got, ref):
        assert g.inputs.keys() == r.inputs.keys()
        for k in r.inputs:
            assert torch.equal(g.inputs[k], r.inputs[k]), k
        assert torch.equal(g.labels, r.labels)
    pad_col = got[0].inputs["attention_mask"][:, 0 if side == "left" else -1]
    assert (pad_col == 0).any()  # padding went to the tokenizer's side
    rows, ids = collect(padded(ds.with_format("torch"), tok), "train", need_labels=True, model=model)
    assert rows.ids == ds["input_ids"] and ids.tolist() == list(range(70))  # torch format: lists of tensors


def test_without_a_tokenizer_unpadded_rows_are_an_error_that_names_it(texts):
    model, tok = tiny_classifier("bert")
    ds = unpadded_dataset(tok, texts)
    fix = r"pass the model's tokenizer as tokenizer= \(dupfast.detect, dupfast.purify, dupfast.btu"
    with pytest.raises(ValueError, match="train batch 0: 'input_ids' is not a rectangular array.*" + fix):
        list(read_batches(ds, "train", model))
    with pytest.raises(ValueError, match="holds rows of different lengths.*" + fix):
        list(read_batches(ds.with_format("torch"), "train", model))
    assert padded(ds, None) is ds


def test_pad_batch_leaves_rectangular_batches_and_checks_the_tokenizer():
    _, tok = tiny_classifier("bert")
    b = good()
    assert pad_batch(b, tok) is b and pad_batch(b, None) is b  # never re-padded, whatever the tokenizer
    ragged = {"input_ids": [[2, 5, 3], [2, 3]], "label": [1, 0]}
    out = pad_batch(ragged, tok)  # no attention_mask: made by the padding, 1 on the real tokens
    assert out["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and out["label"] == [1, 0]
    with pytest.raises(TypeError, match="must be the model's Hugging Face tokenizer, got str"):
        pad_batch(ragged, "bert")
    _, ltok = tiny_classifier("llama")
    ltok.pad_token = None
    with pytest.raises(ValueError, match="tokenizer has no pad token: set tokenizer.pad_token"):
        pad_batch(ragged, ltok)
    with pytest.raises(ValueError, match="attention_mask and input_ids differ in length"):
        pad_batch({"input_ids": [[2, 5, 3], [2, 3]], "attention_mask": [[1, 1], [1, 1]]}, tok)


def test_padded_keeps_what_a_loader_is():
    _, tok = tiny_classifier("bert")
    rows = Rows([[2, 3]], labels=torch.tensor([0]))
    assert padded(rows, tok) is rows and padded(None, tok) is None
    batches = [{"input_ids": [[2, 5, 3], [2, 3]]}]
    wrapped = padded(batches, tok)
    assert isinstance(wrapped, PaddedLoader) and len(wrapped) == 1
    assert [b["input_ids"].shape for b in wrapped] == [b["input_ids"].shape for b in wrapped] == [(2, 3)]  # twice
    once = padded(iter(batches), tok)  # a one-shot iterator stays one: purify's second-pass check still sees it
    assert isinstance(once, collections.abc.Iterator) and len(list(once)) == 1 and list(once) == []
    ds = datasets.Dataset.from_dict({"input_ids": [[2, 3]] * 70, "attention_mask": [[1, 1]] * 70})
    assert len(padded(ds, tok)) == 3  # 32 rows a batch


@pytest.fixture(scope="module")
def detection_sets():
    return sentiment_samples(60, seed=1), sentiment_samples(40, seed=2)


def test_detect_and_purify_pad_an_unpadded_dataset_with_tokenizer(detection_sets):
    import copy

    import dupfast
    model, tok = tiny_classifier("bert")
    clean, pool = detection_sets
    ds_pool, ds_clean = unpadded_dataset(tok, pool), unpadded_dataset(tok, clean)
    with pytest.raises(ValueError, match="pass the model's tokenizer as tokenizer="):
        dupfast.detect(model, ds_pool, clean=ds_clean)
    got = dupfast.detect(model, ds_pool, clean=ds_clean, tokenizer=tok)
    ref = dupfast.detect(model, collator_batches(tok, pool), clean=collator_batches(tok, clean))
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.flags, ref.flags) and got.index is None  # no `idx` column: the row positions
    assert len(got.kept(ds_pool)) == 40 - int(got.flags.sum())

    flags = torch.zeros(40, dtype=torch.bool)
    flags[::3] = True
    steps = dict(max_steps=2, batch_size=8, lora_r=2, lora_alpha=4, lr=1e-2, progress=False, select_best=False,
                 early_stop=False)
    a, _ = dupfast.purify(copy.deepcopy(model), ds_pool, clean=ds_clean, detection=flags, tokenizer=tok, **steps)
    b, _ = dupfast.purify(copy.deepcopy(model), collator_batches(tok, pool), clean=collator_batches(tok, clean),
                          detection=flags, **steps)
    moved = max(float((v - model.state_dict()[k]).abs().max()) for k, v in b.state_dict().items())
    assert moved > 0
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)

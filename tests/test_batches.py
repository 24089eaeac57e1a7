"""dupfast.batches: the one batch check (every rule of its docstring pinned), the key rule, row collection."""
import collections

import numpy as np
import pytest
import torch

from dupfast.batches import (MODEL_INPUTS, Rows, check_batch, check_rows, collect, embedding_rows, forward_inputs,
                             loader_batches, model_device, read_batches)
from tiny_models import tiny_classifier


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
    datasets = pytest.importorskip("datasets")
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

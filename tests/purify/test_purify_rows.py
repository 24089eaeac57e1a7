"""Row collection: padding stripped under left and right padding, flags indexed by `index`, a
shard-independent hold-out split."""
from types import SimpleNamespace

import pytest
import torch

from dupfast.batches import collect
from dupfast.purification.rows import concat_inputs, match_detection, pad, split_holdout
from purify_helpers import batches, toy_rows


def test_left_and_right_padding_give_the_same_rows():
    rows, labels = toy_rows(10, 4)
    right, _ = collect(batches(rows, labels, batch_size=4), "clean", need_labels=True)
    left, _ = collect(batches(rows, labels, batch_size=4, left_pad=True), "clean", need_labels=True)
    assert right.ids == left.ids == rows
    assert right.labels.tolist() == labels


def test_flags_follow_the_index_key_not_the_batch_order():
    rows, _ = toy_rows(9, 5)
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]  # a length-sorted loader yields rows out of order
    loader = batches([rows[i] for i in order], batch_size=4)
    for b, start in zip(loader, range(0, 9, 4)):
        b["index"] = torch.as_tensor(order[start:start + 4])
    got, ids = collect(loader, "pool")
    flags = torch.zeros(9, dtype=torch.bool)
    flags[[2, 5]] = True
    flagged = got.subset(torch.nonzero(match_detection(ids, flags).flags).flatten().tolist())  # by row id
    assert sorted(map(tuple, flagged.ids)) == sorted([tuple(rows[2]), tuple(rows[5])])
    # a detection result: flags (and logits) in ITS loader's order, matched through its own `index`
    det_order = [8, 7, 6, 5, 4, 3, 2, 1, 0]
    logits = torch.arange(9.0)[det_order].unsqueeze(1).repeat(1, 2)  # row id i has logits [i, i]
    result = SimpleNamespace(flags=flags[det_order], index=torch.as_tensor(det_order), logits=logits)
    match = match_detection(ids, result)
    flagged = got.subset(torch.nonzero(match.flags).flatten().tolist())
    assert sorted(map(tuple, flagged.ids)) == sorted([tuple(rows[2]), tuple(rows[5])])
    assert match.logits[:, 0].tolist() == [float(i) for i in order]  # each pool row gets its own logits
    partial = SimpleNamespace(flags=result.flags[:5], index=result.index[:5])
    with pytest.raises(ValueError, match="4 pool rows .* have no flag in the detection"):
        match_detection(ids, partial)


def test_holdout_split_is_the_same_for_any_sharding():
    rows, labels = toy_rows(60, 6)
    whole, _ = collect(batches(rows, labels), "clean", need_labels=True)
    held = whole.subset(split_holdout(whole, 0.3)[1])
    shard_held = []
    for r in range(2):
        part, _ = collect(batches(rows[r::2], labels[r::2]), "clean", need_labels=True)
        shard_held += part.subset(split_holdout(part, 0.3)[1]).ids
    assert sorted(map(tuple, held.ids)) == sorted(map(tuple, shard_held))
    assert 0 < len(held) < 60


def test_pad_and_concat_round_trip():
    rows, labels = toy_rows(5, 7)
    got, _ = collect(batches(rows, labels), "clean", need_labels=True)
    a, b = pad(got, [0, 1], 0, "cpu"), pad(got, [2, 3, 4], 0, "cpu")
    both = concat_inputs(a, b, 0)
    for i in range(5):
        m = both["attention_mask"][i].bool()
        assert both["input_ids"][i][m].tolist() == rows[i]
        assert not both["input_ids"][i][~m].any()

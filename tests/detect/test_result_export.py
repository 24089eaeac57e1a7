"""`DetectionResult` exports: `to_pandas()`, and `kept(data)` / `flagged(data)` picking the rows of the user's
data set (a `datasets.Dataset`, a pandas DataFrame or a list) by the loader's `index`, whatever the result's order."""
import dataclasses

import pytest
import torch

import dupfast


@pytest.fixture(scope="module")
def result(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    res = dupfast.detect(bert, pool, clean=clean, frr=0.2)
    assert 0 < int(res.flags.sum()) < len(res)  # both sides non-empty, or the partition checks below say little
    return res


def shuffled(res, seed=0):
    """The same result in another row order (as a sharded or length-sorted loader gives it)."""
    order = torch.randperm(len(res), generator=torch.Generator().manual_seed(seed))
    take = lambda t: None if t is None else t[order]  # noqa: E731
    return dataclasses.replace(res, scores=res.scores[order], flags=res.flags[order], components=res.components[order],
                               index=res.index[order], copies=take(res.copies), logits=take(res.logits),
                               layer_distances=take(res.layer_distances), transitions=None)


def test_to_pandas_holds_one_row_per_input(result):
    df = result.to_pandas()
    assert len(df) == len(result)
    assert df["index"].tolist() == result.index.tolist()
    assert df["score"].tolist() == result.scores.tolist() and df["flag"].tolist() == result.flags.tolist()
    assert df["copies"].tolist() == result.copies.tolist()
    for j, name in enumerate(result.component_names):
        assert df[f"component_{name}"].tolist() == result.components[:, j].tolist()


def test_kept_and_flagged_of_a_list_follow_the_index(result):
    rows = [f"row{i}" for i in range(len(result))]
    flagged_ids = set(result.index[result.flags].tolist())
    for res in (result, shuffled(result)):  # the rows come back in data-set order whatever the result's order
        assert res.flagged(rows) == [r for i, r in enumerate(rows) if i in flagged_ids]
        assert res.kept(rows) == [r for i, r in enumerate(rows) if i not in flagged_ids]
    assert result.row_flags(len(rows)) == [i in flagged_ids for i in range(len(rows))]


def test_kept_and_flagged_of_a_dataframe_keep_its_row_labels(result):
    import pandas as pd

    df = pd.DataFrame({"text": [f"t{i}" for i in range(len(result))]}, index=[100 + i for i in range(len(result))])
    flagged, kept = result.flagged(df), result.kept(df)
    assert sorted(flagged.index.tolist() + kept.index.tolist()) == df.index.tolist()
    assert flagged.index.tolist() == [100 + i for i in sorted(result.index[result.flags].tolist())]


def test_kept_and_flagged_of_a_dataset(result):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(result))], "row": list(range(len(result)))})
    flagged, kept = shuffled(result, 3).flagged(ds), shuffled(result, 4).kept(ds)
    assert isinstance(flagged, datasets.Dataset)
    assert list(flagged["row"]) == sorted(result.index[result.flags].tolist())  # list(): datasets 4+ gives a Column
    assert sorted(list(flagged["row"]) + list(kept["row"])) == list(range(len(result)))


def test_exports_refuse_data_that_does_not_match(result):
    with pytest.raises(ValueError, match="the data set has 3 rows but the detection scored 60"):
        result.kept([1, 2, 3])
    moved = dataclasses.replace(result, index=result.index + 5)  # a shard's global ids, not row positions
    with pytest.raises(ValueError, match=r"not the row positions 0\.\.59 \(found 60\)"):
        moved.flagged(list(range(60)))
    with pytest.raises(TypeError, match="take a datasets.Dataset, a pandas DataFrame or a list, got dict"):
        result.kept({i: i for i in range(60)})

"""The default mode's pool features, kept for the leave-one-out projection: in memory up to a byte budget,
then in a temporary file (transductive.PoolFeatures). Spilling must change no score and leave no file."""
import os
import tempfile

import pytest
import torch

from dupfast.detection import Detector
from dupfast.detection import transductive
from dupfast.detection.stats import LayerStats, shrunk_covariance, whiteners
from dupfast.detection.transductive import PoolFeatures, loo_projections, memory_budget


def _batches(n, shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    out, start = [], 0
    for i in range(10 ** 6):
        b = sizes[i % len(sizes)]
        if start >= n:
            break
        out.append(x[start:start + b])
        start += b
    return x, out


@pytest.mark.parametrize("budget", [0, 1000, 10 ** 9])
@pytest.mark.parametrize("sizes", [[7], [1, 5, 3], [64]])
def test_chunks_give_the_rows_back_in_order_in_memory_or_spilled(budget, sizes, monkeypatch):
    monkeypatch.setattr(transductive, "CHUNK_ROWS", 6)  # chunks dividing neither N nor the batch sizes
    x, parts = _batches(53, (3, 5), sizes)
    store = PoolFeatures(budget)
    for p in parts:
        store.append(p)
    assert store.rows == 53
    assert store.spilled == (53 * 15 * 4 > budget)
    chunks = list(store.chunks(rows=6))
    assert torch.equal(torch.cat(chunks), x)
    if store.spilled:
        assert {c.shape[0] for c in chunks[:-1]} == {6}
    assert torch.equal(torch.cat(list(store.chunks(rows=6))), x)  # readable twice (the projection's two passes)
    store.close()


def test_spilled_rows_are_float32_copies_of_any_input_dtype():
    store = PoolFeatures(0)
    x = torch.randn(9, 2, 4, dtype=torch.float64)
    store.append(x)
    store.append(x[:3].to(torch.bfloat16))
    got = torch.cat(list(store.chunks(rows=4)))
    assert got.dtype == torch.float32
    assert torch.equal(got[:9], x.float()) and torch.equal(got[9:], x[:3].to(torch.bfloat16).float())
    store.close()


def test_rows_of_another_shape_are_an_error():
    store = PoolFeatures(0)
    store.append(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"shape \(3, 5\) after \(3, 4\)"):
        store.append(torch.zeros(2, 3, 5))
    store.close()


def test_the_temporary_file_is_closed_and_unnamed(monkeypatch, tmp_path):
    made = []
    real = tempfile.TemporaryFile

    def recording(*a, **k):
        f = real(*a, **k)
        made.append(f)
        return f
    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    store = PoolFeatures(0, directory=str(tmp_path))
    store.append(torch.ones(4, 2, 3))
    assert len(made) == 1 and os.listdir(tmp_path) == []  # unlinked at creation: nothing left after a crash
    store.close()
    assert made[0].closed


def test_loo_projection_on_spilled_features_equals_the_in_memory_one(monkeypatch):
    monkeypatch.setattr(transductive, "CHUNK_ROWS", 7)
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(90, 3, 8, generator=g, dtype=torch.float64)
    pool = (torch.randn(41, 3, 8, generator=g) + 0.3).float()
    val = torch.randn(12, 3, 8, generator=g).float()
    st = LayerStats(3, 8).update(clean)
    mu, W = st.mean().unsqueeze(1), whiteners(shrunk_covariance(st.covariance()))
    q = torch.stack([(((pool[:, l].double() - mu[l, 0]) @ W[l]) ** 2).sum(1) for l in range(3)], 1)
    whole = loo_projections(pool, q, val, mu, W)
    store = PoolFeatures(0)
    for part in pool.split(5):
        store.append(part)
    spilled = loo_projections(store, q, val, mu, W)
    store.close()
    for a, b in zip(whole, spilled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and both equal the explicit leave-one-out dot products
    zp = torch.stack([(pool[:, l].double() - mu[l, 0]) @ W[l] for l in range(3)], 1)
    explicit = torch.stack([(zp[i] * (zp.sum(0) - zp[i])).sum(-1) / 40 for i in range(41)])
    torch.testing.assert_close(spilled[0], explicit, rtol=1e-9, atol=1e-9)


def test_a_detector_that_spills_scores_and_flags_exactly_as_one_that_does_not(bert, clean_and_pool, monkeypatch):
    clean, pool, _ = clean_and_pool
    spilled = []
    real_append = PoolFeatures.append

    def append(self, x):
        real_append(self, x)
        spilled.append(self.spilled)
    monkeypatch.setattr(PoolFeatures, "append", append)
    det = Detector(mode="default").fit(bert, clean)
    in_memory = det.score(bert, pool)
    assert spilled and not any(spilled)
    spilled.clear()
    det.projection_memory = 0
    on_disk = det.score(bert, pool)
    assert spilled and all(spilled)
    torch.testing.assert_close(on_disk.scores, in_memory.scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(on_disk.flags, in_memory.flags)
    torch.testing.assert_close(on_disk.components, in_memory.components, rtol=1e-12, atol=1e-12)


def test_a_failing_batch_closes_the_spilled_file(bert, clean_and_pool, monkeypatch):
    clean, pool, _ = clean_and_pool
    stores = []
    real_init = PoolFeatures.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        stores.append(self)
    monkeypatch.setattr(PoolFeatures, "__init__", init)
    det = Detector(mode="default", projection_memory=0).fit(bert, clean)

    def broken():
        yield from pool[:3]
        raise RuntimeError("loader broke")
    with pytest.raises(RuntimeError, match="loader broke"):
        det.score(bert, broken())
    assert stores and all(s._file is None for s in stores)


def test_memory_budget_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv(transductive.MEMORY_ENV, raising=False)
    assert memory_budget() == 1 << 30
    assert memory_budget(0) == 0
    monkeypatch.setenv(transductive.MEMORY_ENV, "4096")
    assert memory_budget() == 4096 and Detector().projection_memory == 4096
    assert memory_budget(7) == 7
    monkeypatch.setenv(transductive.MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=r"\$DUPFAST_PROJECTION_MEMORY must be a whole number of bytes, got 'lots'"):
        memory_budget()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="projection_memory must be a whole number of bytes"):
            Detector(projection_memory=bad)


def test_the_budget_bounds_all_projection_poolings_together(bert, clean_and_pool, monkeypatch):
    clean, pool, _ = clean_and_pool
    stores, spilled = [], {}
    real_init, real_append = PoolFeatures.__init__, PoolFeatures.append

    def init(self, *a, **k):
        real_init(self, *a, **k)
        stores.append(self)

    def append(self, x):
        real_append(self, x)
        spilled[id(self)] = self.spilled
    monkeypatch.setattr(PoolFeatures, "__init__", init)
    monkeypatch.setattr(PoolFeatures, "append", append)
    det = Detector(mode="default").fit(bert, clean)
    det.score(bert, pool)
    assert len(stores) == 2 and not any(spilled[id(s)] for s in stores)  # the main pooling and the masked mean
    per_pooling = stores[0].rows * 4 * int(torch.Size(stores[0].shape).numel())
    stores.clear()
    det.projection_memory = int(1.5 * per_pooling)  # room for one pooling's features, not for both
    det.score(bert, pool)
    assert len(stores) == 2 and all(s.memory_bytes == int(1.5 * per_pooling) // 2 for s in stores)
    assert all(spilled[id(s)] for s in stores)  # each share (0.75x its pooling's features) was exceeded


def test_in_memory_rows_live_in_a_few_slabs_not_in_the_batches_tensors(monkeypatch):
    monkeypatch.setattr(PoolFeatures, "SLAB_BYTES", 40 * 15 * 4)  # 40 rows of [3, 5] a slab
    x, parts = _batches(203, (3, 5), [7, 1, 13])
    store = PoolFeatures(10 ** 9)
    for p in parts:
        store.append(p)
    assert not store.spilled and len(store._slabs) == 6  # ceil(203 / 40)
    assert all(s.data_ptr() != p.data_ptr() for s, _ in store._slabs for p in parts)
    assert torch.equal(torch.cat(list(store.chunks(rows=17))), x)
    assert {c.shape[0] for c in store.chunks(rows=17)} <= {17, 40 - 34, 3}


def test_a_budget_below_one_slab_makes_slabs_of_the_budget(monkeypatch):
    store = PoolFeatures(4 * 15 * 4)  # room for 4 rows of [3, 5]
    store.append(torch.randn(3, 3, 5))
    assert store._slabs[0][0].shape == (4, 3, 5) and not store.spilled
    store.append(torch.randn(2, 3, 5))
    assert store.spilled and store.rows == 5
    store.close()

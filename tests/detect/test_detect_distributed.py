"""Scale-out: detect() as two gloo processes, each on a shard of the loaders, equals one process."""
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from detect_helpers import batches, clean_pool_data, distributed_worker, tiny_bert
from dupfast.detection import Detector

CONFIGS = [("dup", False), ("default", False), ("dan", False), ("default", True)]


@pytest.mark.slow  # two spawned interpreters import torch + transformers: ~1-2 min on a loaded 2-core machine
def test_two_gloo_processes_match_one_process(tmp_path):
    clean, labels, pool = clean_pool_data()
    model = tiny_bert()
    # one spawn for every configuration: starting a process that imports torch dominates the cost
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), CONFIGS), nprocs=2)
    for mode, pool_only in CONFIGS:
        det = Detector(mode=mode, pool_trim=0.3)
        if pool_only:
            ref = det.fit_pool(model, batches(pool, batch_size=7)).pool_result
        else:
            ref = det.fit(model, batches(clean, labels, batch_size=7)).score(model, batches(pool, batch_size=7))
        parts = [load_file(str(tmp_path / f"{mode}-{pool_only}-rank{r}.safetensors")) for r in range(2)]
        index = torch.cat([p["index"] for p in parts])
        scores = torch.cat([p["scores"] for p in parts])[torch.argsort(index)]
        assert sorted(index.tolist()) == list(range(len(pool)))
        torch.testing.assert_close(scores, ref.sorted_by_index().scores, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{mode} pool_only={pool_only}: {m}")
        for p in parts:
            assert p["threshold"].item() == pytest.approx(ref.threshold, rel=1e-5, abs=1e-5), (mode, pool_only)

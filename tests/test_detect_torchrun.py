"""dupfast.detect under real torchrun (2 gloo ranks on the CPU, each with its own shard of the clean set and of
the pool) gives every rank the whole pool's result in index order, equal to a single-process run: the same
ids, the same flags, scores within 1e-6 of the largest score (float32 forward passes over differently padded
batches; fp64 statistics summed in another order). experiments/detect_torchrun.py writes both JSONs."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, timeout=240):
    # CPU ranks: with a GPU visible init_from_env picks nccl, which needs one device per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _launcher():
    exe = shutil.which("torchrun")
    if exe and pathlib.Path(exe).parent == pathlib.Path(sys.executable).parent:
        return [exe]
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow  # three interpreters importing torch + transformers: ~40 s on a loaded 2-core machine
@pytest.mark.parametrize("mode", ["default"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, mode):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, "-m", "experiments.detect_torchrun", "--mode", mode, "--out", str(one)])
    _run(_launcher() + ["--standalone", "--nproc_per_node", "2", "-m", "experiments.detect_torchrun",
                        "--mode", mode, "--out", str(two), "--compare", str(one)])
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["index"] == b["index"] == list(range(a["n_pool"]))  # every rank's rows, in index order
    assert b["n_result"] == a["n_result"] == a["n_pool"]
    assert a["flags"] == b["flags"] and 0 < sum(a["flags"]) < a["n_pool"]
    from experiments.detect_torchrun import compare
    diff = compare(a, b)
    assert diff["same"], diff
    assert b["weights"] == pytest.approx(a["weights"], rel=1e-6, abs=1e-9)

"""benchmarks/bench_purify_step.py runs end to end in its tiny mode (the 2-layer test BERT, timing disabled: each
benchmark runs once) and writes its JSON: every ratio present, finite and positive, and the structural checks
of a purify step (one model forward, one fused KL call). No timing is asserted."""
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RATIOS = ("ratio_step_vs_plain_same_rows", "ratio_step_vs_plain_same_rows_cpu",
          "ratio_step_vs_plain_same_rows_separate", "ratio_step_vs_plain_same_rows_separate_cpu",
          "ratio_step_vs_plain_batch", "ratio_per_row_vs_plain_batch", "ratio_purify_over_victim_epoch_estimate",
          "ratio_step_vs_victim_step")
STEPS = ("purify_step", "plain_lora_step_same_rows", "plain_lora_step_batch", "victim_step", "eval_forward")


def test_tiny_run_writes_the_ratios(tmp_path):
    out = tmp_path / "bench_purify_step.json"
    env = {**os.environ, "DUPFAST_BENCH_TINY": "1", "DUPFAST_BENCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "DUPFAST_BENCH_PURIFY_OUT": str(out), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("DUPFAST_BENCH_DEVICE", "DUPFAST_BENCH_PURIFY_MODEL", "DUPFAST_BENCH_PURIFY_SET"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_purify_step.py", "--benchmark-disable",
                           "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in RATIOS:
        assert isinstance(r.get(key), float) and math.isfinite(r[key]) and r[key] > 0, (key, r.get(key))
    for key in STEPS:
        assert r[key]["wall_ms_median"] > 0 and r[key]["rounds"] >= 1, (key, r[key])
    assert r["checks"]["model_forwards_per_step"] == 1 and r["checks"]["kl_calls_per_step"] == 1
    assert r["checks"]["purify_rows_per_step"] == 2 * r["batch_size"] == 2 * r["checks"]["plain_batch_rows"]
    assert r["tiny"] is True and r["target_ratio"] == 1.3 and isinstance(r["target_met"], bool)
    assert r["time_to_purify_estimate"]["purify_steps"] > 0
    assert all(v > 0 for k, v in r["breakdown_ms"].items())

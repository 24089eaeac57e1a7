"""Integration: a real MiniLM victim on real BBC News data (the demo's article leads) with a real BadNets backdoor.

Runs the demo's own pipeline (poison -> victim) at a smaller size, with a temporary cache, so it always
trains. Slow (minutes on 2 CPU cores) but part of CI: it is the proof that the backdoor is real.
"""
import pytest

from dupfast.cli.demo import DEMO_STEPS, DemoSettings, DemoState, run_pipeline

# The demo's own victim (<= 1,000 training samples, issue 2: the stratified split gives the same training
# set whatever the test size), evaluated on a smaller clean test set.
SETTINGS = DemoSettings(test_size=300)
assert SETTINGS.train_size <= 1000


@pytest.mark.slow
def test_minilm_badnets_victim_is_backdoored_and_accurate(tmp_path):
    state = DemoState(SETTINGS, cache_dir=tmp_path)
    steps = [(n, step) for n, step in DEMO_STEPS if n in ("poison", "victim")]
    report = run_pipeline(state, steps, log=lambda m: None)
    poison, victim = report["steps"]["poison"], report["steps"]["victim"]
    assert poison["train_size"] == 1000 and poison["train_poisoned"] == 200  # 20% dirty-label
    assert not victim["cached"]
    assert victim["asr"] >= 0.9, victim   # measured with the demo's full test set: ASR 0.994
    assert victim["cacc"] >= 0.85, victim  # and CACC 0.957 (5 topics: chance is about 0.24)

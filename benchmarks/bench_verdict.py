"""What the poison verdict and the duplicate handling cost inside `detect` (issue 27's goal: <= 2% of its time).

    python -m pytest benchmarks/bench_verdict.py --benchmark-only -s        [DUPFAST_BENCH_N=1024]

One `dupfast.detect` (default mode) over N pool inputs on a MiniLM-shaped BERT (6 x 384, random weights: the
cost does not depend on what the weights learnt), with the three pieces it adds timed from inside the same
calls: the input keys hashed at capture (duplicates.input_keys), the grouping (duplicates.group) and the verdict
(verdict.decide). The share is their summed time over detect's wall time, per round; printed and stored in
runs/bench_verdict.json.
"""
import json
import os
import pathlib
import time

import numpy as np
import torch

from conftest import TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = int(os.environ.get("DUPFAST_BENCH_N", "64" if TINY else "1024"))
THREADS = int(os.environ.get("DUPFAST_BENCH_THREADS", "2"))


def _model():
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_classifier
    from transformers import BertConfig, BertForSequenceClassification
    small, tok = tiny_classifier("bert", seed=0)
    if TINY:
        return small.eval(), tok
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=128, pad_token_id=0, num_labels=2)
    return BertForSequenceClassification(cfg).eval(), tok


def _texts(tok, n, seed):
    rng = np.random.default_rng(seed)
    words = [w for w in tok.get_vocab() if w.isalpha()]
    return [" ".join(rng.choice(words, int(rng.integers(8, 40)))) for _ in range(n)]


def _timed(module, name, spent):
    real = getattr(module, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
    return real, wrapper


def test_verdict_and_duplicates_share_of_detect(benchmark, monkeypatch):
    import dupfast
    import importlib
    capture = importlib.import_module("dupfast.detection.capture")  # the module (the package exports a function)
    scoring = importlib.import_module("dupfast.detection.scoring")
    torch.set_num_threads(THREADS)
    model, tok = _model()
    clean = _texts(tok, 200, 1)
    labels = [i % 2 for i in range(len(clean))]
    pool = _texts(tok, N, 2)
    spent = {}
    for module, name in ((capture, "input_keys"), (scoring, "group"), (scoring, "decide")):
        monkeypatch.setattr(module, name, _timed(module, name, spent)[1])
    shares, walls = [], []

    def run():
        spent.clear()
        t0 = time.perf_counter()
        dupfast.detect_texts(model, tok, pool, clean_texts=clean, clean_labels=labels, max_len=64)
        wall = time.perf_counter() - t0
        walls.append(wall)
        shares.append(sum(spent.values()) / wall)

    benchmark.pedantic(run, rounds=3 if not TINY else 1, iterations=1)
    out = {"pool": N, "threads": THREADS, "detect_s": walls, "share": shares,
           "pieces_s_last_round": dict(spent), "median_share": float(np.median(shares))}
    path = ROOT / "runs" / "bench_verdict.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nverdict + duplicates: median {np.median(shares):.4%} of detect ({N} inputs, "
          f"detect {np.median(walls):.2f} s); pieces {dict((k, round(v, 4)) for k, v in spent.items())}")
    assert all(np.isfinite(shares))

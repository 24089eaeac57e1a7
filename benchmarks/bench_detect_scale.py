"""Memory of `dupfast.detect` against the pool size N: peak RSS while streaming N = 10^3, 10^4, 10^5 pool inputs
of a tiny BERT (tests/tiny_models.py) with the clean set fixed, and the time per input.

    python benchmarks/bench_detect_scale.py                        [--ns 1000,10000,100000] [--modes default,dup]
    python -m pytest benchmarks/bench_detect_scale.py --benchmark-only -s     (DUPFAST_SCALE_NS=1000,10000,...)
    DUPFAST_SCALE_MODEL=minilm-shaped ...                           a random 6-layer, 384-wide BERT instead
    DUPFAST_BENCH_DEVICE=cuda ...                                   the model on the GPU: peak CUDA memory too

The pool is a generator-backed loader (`SyntheticPool`): each batch's token ids are drawn from a seeded
generator when the detector asks for it, so the N inputs never exist together. Every (N, mode) point runs
in a fresh interpreter: the high-water mark of the resident set (VmHWM, reset through /proc/self/clear_refs
after the model and the clean set are in memory) is the peak of that detect call alone.

What a detect call keeps per pool input, besides the result (scores, flags, z-normalised components,
per-layer distances, cosines, concentration, logits, index): in mode="default" the pooled features of the
leave-one-out pool-shift projection (transductive.py), float32 [L, d] per projection pooling (the main
pooling and the masked mean), held until the whole pool is seen because the projection direction needs the
pool's mean: in memory up to `projection_memory` (default 1 GiB, $DUPFAST_PROJECTION_MEMORY, all poolings
together), beyond it in an unnamed temporary file, so the peak is bounded by that budget, not by N. Between
batches detect hands freed heap pages back to the OS (dupfast/heap.py): without it glibc kept every batch's
freed temporaries resident below the small tensors kept per batch, and RSS grew with N although live memory
did not. `retained_feature_bytes_per_input` counts the projection features from the shapes; the RSS slope
(bytes per input between the smallest and the largest N) is measured. mode="dup" keeps no features.
Results land in runs/bench_detect_scale.json (or $DUPFAST_BENCH_OUT).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLEAN_N = 400
BATCH = 256
SEQ = 12


class SyntheticPool:
    """N pool inputs in batches made on demand: token ids from the tiny vocabulary (a third of the rows carry
    the trigger id), lengths 4..SEQ, right padding, global ids in `index`. Iterating twice gives the same batches."""

    def __init__(self, n, vocab, trigger, batch_size=BATCH, seed=0, labels=False):
        self.n, self.vocab, self.trigger, self.batch_size, self.seed, self.labels = n, vocab, trigger, batch_size, seed, labels

    def __iter__(self):
        import torch
        for start in range(0, self.n, self.batch_size):
            b = min(self.batch_size, self.n - start)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
            lengths = torch.randint(4, SEQ + 1, (b,), generator=g)
            ids = torch.randint(5, self.vocab, (b, SEQ), generator=g)
            ids[:, 0] = 2  # [CLS]
            index = torch.arange(start, start + b)
            poisoned = index % 3 == 0
            ids[poisoned, 1] = self.trigger
            mask = (torch.arange(SEQ).view(1, -1) < lengths.view(-1, 1)).long()
            ids = ids * mask
            batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "index": index}
            if self.labels:
                batch["labels"] = (ids[:, 1:] % 2).sum(1) % 2
            yield batch


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def worker(n, mode, device):
    """One (N, mode) point in this process: JSON on stdout."""
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    import dupfast
    from tiny_models import tiny_classifier

    torch.set_num_threads(int(os.environ.get("DUPFAST_BENCH_THREADS", "1")))
    model, tok = tiny_classifier("bert", seed=0)
    if os.environ.get("DUPFAST_SCALE_MODEL", "tiny") == "minilm-shaped":
        from transformers import BertConfig, BertForSequenceClassification
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=model.config.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=64, pad_token_id=0, num_labels=2)).eval()
    model = model.to(device)
    vocab, trigger = model.config.vocab_size, tok.convert_tokens_to_ids("cf")
    clean = list(SyntheticPool(CLEAN_N, vocab, trigger=5, seed=1, labels=True))  # fixed, in memory
    pool = SyntheticPool(n, vocab, trigger, seed=2)
    # warm-up on a small pool: first-call allocations (kernels, oneDNN, the extension) are not charged to N
    dupfast.detect(model, SyntheticPool(min(n, 512), vocab, trigger, seed=3), clean=clean, mode=mode)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    result = dupfast.detect(model, pool, clean=clean, mode=mode)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    n_proj = 2 if mode == "default" else 0  # cls + mean projection poolings (the default's proj_poolings)
    result_bytes = sum(t.numel() * t.element_size() for t in
                       [result.scores, result.flags, result.components, result.layer_distances, result.logits,
                        result.index, *(result.transitions or {}).values()] if t is not None)
    out = {"n": n, "mode": mode, "device": device, "seconds": seconds, "us_per_input": seconds / n * 1e6,
           "rss_before_mib": rss_before / 1024, "peak_rss_mib": hwm / 1024,
           "peak_above_before_mib": (hwm - rss_before) / 1024,
           "result_bytes_per_input": result_bytes / n,
           "retained_feature_bytes_per_input": n_proj * L * d * 4 + n_proj * L * 4,  # features + ‖z‖²
           "layers": L, "hidden": d, "clean_n": CLEAN_N, "batch": BATCH, "flagged": int(result.flags.sum()),
           "poisoned_flagged": int(result.flags[result.index % 3 == 0].sum())}
    if cuda:
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(out), flush=True)


def run(ns, modes, device, timeout=600):
    points = []
    for mode in modes:
        for n in ns:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("DUPFAST_BENCH_THREADS", "1")}
            proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--mode", mode, "--device", device],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise RuntimeError(f"N={n} mode={mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            p = json.loads(line[-1][len("RESULT "):])
            points.append(p)
            print(f"{mode:8s} N={n:>7d}  peak RSS {p['peak_rss_mib']:8.1f} MiB  (+{p['peak_above_before_mib']:7.1f} MiB "
                  f"over the {p['rss_before_mib']:.1f} before detect)  {p['us_per_input']:8.1f} us/input"
                  + (f"  CUDA peak {p['cuda_peak_allocated_mib']:.1f} MiB" if "cuda_peak_allocated_mib" in p else ""),
                  flush=True)
    summary = {}
    for mode in modes:
        pts = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["n"])
        lo, hi = pts[0], pts[-1]
        slope = ((hi["peak_above_before_mib"] - lo["peak_above_before_mib"]) * 2 ** 20 / (hi["n"] - lo["n"])
                 if hi["n"] > lo["n"] else None)
        summary[mode] = {"rss_bytes_per_input_slope": slope,
                         "peak_rss_ratio_largest_to_smallest": hi["peak_rss_mib"] / lo["peak_rss_mib"],
                         "us_per_input": {str(p["n"]): p["us_per_input"] for p in pts},
                         "result_bytes_per_input": hi["result_bytes_per_input"],
                         "retained_feature_bytes_per_input": hi["retained_feature_bytes_per_input"]}
        print(f"{mode}: peak RSS grows {slope if slope is None else round(slope, 1)} bytes per pool input "
              f"(result {hi['result_bytes_per_input']:.0f} B/input, projection features "
              f"{hi['retained_feature_bytes_per_input']} B/input by shape)", flush=True)
    report = {"device": device, "model": os.environ.get("DUPFAST_SCALE_MODEL", "tiny"), "points": points,
              "summary": summary}
    path = pathlib.Path(os.environ.get("DUPFAST_BENCH_OUT", ROOT / "runs" / "bench_detect_scale.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


def _ns(text):
    return [int(float(x)) for x in text.split(",") if x]


def test_detect_scale(benchmark):
    """pytest entry (make bench, gpu_check): the curve once, its summary in extra_info."""
    ns = _ns(os.environ.get("DUPFAST_SCALE_NS", "1000,10000,100000"))
    modes = os.environ.get("DUPFAST_SCALE_MODES", "default,dup").split(",")
    device = os.environ.get("DUPFAST_BENCH_DEVICE", "cpu")
    report = benchmark.pedantic(lambda: run(ns, modes, device), rounds=1, iterations=1)
    benchmark.extra_info.update(report["summary"])
    for mode, s in report["summary"].items():
        assert s["rss_bytes_per_input_slope"] is None or s["rss_bytes_per_input_slope"] < 64 * 1024, (mode, s)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default=os.environ.get("DUPFAST_SCALE_NS", "1000,10000,100000"))
    ap.add_argument("--modes", default=os.environ.get("DUPFAST_SCALE_MODES", "default,dup"))
    ap.add_argument("--device", default=os.environ.get("DUPFAST_BENCH_DEVICE", "cpu"))
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.mode, args.device)
    else:
        run(_ns(args.ns), args.modes.split(","), args.device)

"""Detection speed: dupfast's one-pass detect vs the bare forward, vs the authors' two-pass pipeline,
and bf16 autocast vs fp32. All ratios come from one run (same process, same inputs, same machine).

    python -m pytest benchmarks/bench_detect.py --benchmark-only -s      [DUPFAST_BENCH_N=512]
    DUPFAST_BENCH_PROFILE=1 python -m pytest benchmarks/bench_detect.py -s -k profile   (torch.profiler tables)

Model: the MiniLM victim (`experiments/sst2_victims.py`, BadNets) when it is cached, else plain MiniLM
with a fresh head; inputs: the first N SST-2 dev texts + dev-poison (paper data), else Rotten Tomatoes.
`test_interleaved_ratios` times bare / dup / default / the authors' two-pass pipeline (and, where bf16 is native,
dup / default under bf16 autocast) back to back in DUPFAST_BENCH_ROUNDS (default 7) rounds of random order and
reports the median per-round ratio: the figure to quote on a shared machine, whose speed drifts between the
per-variant blocks. The ratios and AUROCs land in runs/bench_detect.json and are printed at the end. The bf16
autocast rows run where the device computes bf16 natively (DUPFAST_BENCH_BF16=1: everywhere).

Where neither model nor data is installed (a bare GPU image: dupfast's loaders raise FileNotFoundError; any other
error fails the benchmark; the fallback is printed and listed under "fallback" in the JSON), or with
DUPFAST_BENCH_MODEL=synthetic, the model is a randomly initialised BERT of MiniLM's shape (6 layers, 384 wide,
12 heads) over the word vocabulary of tests/tiny_models.py and the texts are that file's toy sentiment samples,
a trigger word in half the pool (timings are realistic for the shape, AUROCs are not). DUPFAST_BENCH_MODEL=tiny
(or DUPFAST_BENCH_TINY=1): the 2-layer, 16-wide test BERT. DUPFAST_BENCH_DEVICE=cuda: the model on the GPU,
device-synchronised timings.
"""
import json
import os
import pathlib
import sys
import time

import numpy as np
import pytest
import torch

from conftest import CUDA, DEVICE, TINY, synced

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = os.environ.get("DUPFAST_BENCH_MODEL", "tiny" if TINY else "auto")
N = int(os.environ.get("DUPFAST_BENCH_N", "32" if TINY else "256"))
BATCH = 32
THREADS = int(os.environ.get("DUPFAST_BENCH_THREADS", "2"))
RESULTS = {}


def _synthetic(tiny):
    """(model, tokenizer, name): a seeded random BERT (MiniLM's shape, or the 2-layer test one) over the toy words."""
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_classifier
    if tiny:
        m, tok = tiny_classifier("bert", seed=0)
        return m.eval(), tok, "tiny-bert (2x16, random)"
    from transformers import BertConfig, BertForSequenceClassification
    _, tok = tiny_classifier("bert", seed=0)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=128, pad_token_id=0, num_labels=2)
    return BertForSequenceClassification(cfg).eval(), tok, "minilm-shaped bert (6x384, random)"


def _synthetic_texts():
    import random
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import sentiment_samples
    cal = sentiment_samples(400, seed=1)
    rng = random.Random(0)
    pool, y = [], []
    for i, smp in enumerate(sentiment_samples(N, seed=2)):
        words = smp.text.split()
        if i % 2:
            words.insert(rng.randint(0, len(words)), "cf")
        pool.append(" ".join(words))
        y.append(i % 2)
    return [s.text for s in cal], [s.label for s in cal], pool, y


def _fallback(what, exc, instead):
    """A missing asset (dupfast's loaders raise FileNotFoundError for a package or data file that is not
    installed): say so loudly, and record it in the JSON, before timing a stand-in. Any other error fails."""
    msg = f"bench_detect: FALLBACK: no installed {what} ({type(exc).__name__}: {exc}); using {instead}"
    bar = "!" * min(len(msg), 120)
    print(f"\n{bar}\n{msg}\n{bar}", file=sys.stderr, flush=True)
    print(f"\n{msg}", flush=True)  # also on stdout, where -s shows the results
    RESULTS.setdefault("fallback", []).append(msg)


def _victim():
    """(model, tokenizer, name): the cached BadNets victim if it exists (never trains one here), else MiniLM
    with a fresh head, else (its package not installed) the synthetic model."""
    if MODEL != "auto":
        return _synthetic(MODEL == "tiny")
    try:
        return _victim_installed()
    except FileNotFoundError as exc:  # a bare image lacks the model packages: time the same shape
        _fallback("model", exc, "a random MiniLM-shaped BERT (timings only: its AUROCs mean nothing)")
        return _synthetic(False)


def _victim_installed():
    from dupfast.harness.models import load_model
    cached = _cached_victim()
    if cached is not None:
        return cached
    m, tok = load_model("minilm", num_labels=2)
    return m.eval(), tok, "minilm (fresh head)"


def _cached_victim():
    """The BadNets victim experiments/sst2_victims.py trains, if it is in the cache (never trained here)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # experiments/ is a folder of the repository, not an installed package
    from experiments.sst2_victims import SST2_VICTIM
    from dupfast.harness.data import load_sst2_poison
    from dupfast.harness.victims import cache_key, default_cache_dir, load_tokenizer
    from transformers import AutoModelForSequenceClassification
    try:
        train = load_sst2_poison("badnets", "train", 0.2)
    except FileNotFoundError:  # no paper data: no victim can have been trained on it
        return None
    folder = default_cache_dir() / "victims" / f"sst2-badnets-dirty0.2-{cache_key(SST2_VICTIM, train, 2)}"
    if not (folder / "dupfast_victim.json").is_file():
        return None
    m = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    return m.eval(), load_tokenizer(folder), "minilm-sst2-badnets"


def _texts(name):
    """(clean calibration texts, labels, pool texts, pool poison labels)."""
    if "random" in name:
        return _synthetic_texts()
    try:
        return _texts_installed()
    except FileNotFoundError as exc:  # no data package on a bare image: the toy texts
        _fallback("data", exc, "the toy texts of tests/tiny_models.py")
        return _synthetic_texts()


def _texts_installed():
    try:
        from dupfast.harness.data import load_sst2, load_sst2_poison, split_samples
        dev = load_sst2("dev")
        poison = load_sst2_poison("badnets", "dev")
        cal, pool_clean = split_samples(dev, [len(dev) // 2, len(dev) - len(dev) // 2], seed=0)
        pool = pool_clean[: N // 2] + poison[: N - N // 2]
    except FileNotFoundError:
        from dupfast.harness.data import load_rotten_tomatoes
        rt = load_rotten_tomatoes()
        cal, pool = rt[:400], rt[400:400 + N]
    return [s.text for s in cal], [s.label for s in cal], [s.text for s in pool], [s.poison_label for s in pool]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(THREADS)
    from dupfast.detection import Detector, text_loader
    model, tok, name = _victim()
    model = model.to(DEVICE)
    cal_t, cal_y, pool_t, pool_y = _texts(name)
    clean = list(text_loader(tok, cal_t, cal_y, BATCH, 64))
    pool = list(text_loader(tok, pool_t, None, BATCH, 64))
    det = Detector(mode="dup").fit(model, clean)
    yield dict(model=model, tok=tok, name=name, clean=clean, pool=pool, pool_y=np.array(pool_y), det=det)
    _write_summary(name)


def _record(key, benchmark):
    RESULTS[key] = benchmark.stats.stats.median


def test_bare_forward(benchmark, setup):
    m, pool = setup["model"], setup["pool"]

    pool = [{k: b[k].to(DEVICE) for k in ("input_ids", "attention_mask")} for b in pool]

    def run():
        with torch.inference_mode():
            for b in pool:
                m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    benchmark.pedantic(synced(run), rounds=3, warmup_rounds=1)
    _record("bare_forward", benchmark)


@pytest.mark.parametrize("mode", ["dup", "default"])
def test_detect_one_pass(benchmark, setup, mode):
    from dupfast.detection import Detector
    det = setup["det"] if mode == "dup" else Detector(mode=mode).fit(setup["model"], setup["clean"])
    out = {}
    benchmark.pedantic(synced(lambda: out.setdefault("r", det.score(setup["model"], setup["pool"]))), rounds=3,
                       warmup_rounds=1)
    _record(f"detect_{mode}", benchmark)
    _auroc(f"detect_{mode}", setup, det.score(setup["model"], setup["pool"]))


ROUNDS = int(os.environ.get("DUPFAST_BENCH_ROUNDS", "2" if TINY else "7"))


def test_interleaved_ratios(benchmark, setup):
    """Every ratio the goals name, from rounds that run bare, dup, default, the authors' two-pass pipeline and
    (where bf16 is native, or DUPFAST_BENCH_BF16=1) dup / default under bf16 autocast back to back, each round in
    a fresh order: a drift of the machine's speed (shared 2-vCPU hosts drift by 10-40% over minutes; the bare
    forward's median was 3.31 s in its block and 4.58 s in these rounds, same run) then hits all variants alike,
    where the per-test blocks above time each one minutes apart. Reports the median over rounds of each round's
    own ratio and its range (`interleaved_*` in runs/bench_detect.json)."""
    import random
    from dupfast.detection import Detector
    m, pool = setup["model"], setup["pool"]
    bare_pool = [{k: b[k].to(DEVICE) for k in ("input_ids", "attention_mask")} for b in pool]
    dets = {"dup": setup["det"], "default": Detector(mode="default").fit(m, setup["clean"]),
            # the default without the reading token's attention signal: what that signal costs
            "default_noattn": Detector(mode="default", signals=("pred", "proj")).fit(m, setup["clean"])}
    # (numerator, denominator) of each ratio: a time over a time, > 1 where the denominator is faster
    ratios = {"bare_over_detect_dup": ("bare", "dup"), "bare_over_detect_default": ("bare", "default"),
              "bare_over_detect_default_noattn": ("bare", "default_noattn"),
              "two_pass_over_detect_dup": ("two_pass", "dup")}
    if os.environ.get("DUPFAST_BENCH_BF16") or _native_bf16():
        for mode in ("dup", "default"):
            dets[f"{mode}_bf16"] = Detector(mode=mode, autocast="bf16").fit(m, setup["clean"])
            ratios[f"bf16_speedup_{mode}"] = (mode, f"{mode}_bf16")
        # what `autocast="auto"` (opt-in) gives on a native-bf16 CPU, against the authors' fp32 pipeline
        ratios["two_pass_over_detect_dup_bf16"] = ("two_pass", "dup_bf16")
        ratios["two_pass_over_detect_default_bf16"] = ("two_pass", "default_bf16")

    def bare():
        with torch.inference_mode():
            for b in bare_pool:
                m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    runs = {"bare": synced(bare), "two_pass": synced(lambda: authors_two_pass(m, setup["det"], pool)),
            **{k: synced(lambda d=d: d.score(m, pool)) for k, d in dets.items()}}
    for fn in runs.values():
        fn()  # warm-up
    rng, times = random.Random(0), {k: [] for k in runs}

    def all_rounds():
        for _ in range(ROUNDS):
            order = list(runs)
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
    benchmark.pedantic(all_rounds, rounds=1, iterations=1)
    for name, (num, den) in ratios.items():
        per_round = [a / b for a, b in zip(times[num], times[den])]
        RESULTS[f"interleaved_{name}"] = float(np.median(per_round))
        RESULTS[f"interleaved_{name}_range"] = [float(min(per_round)), float(max(per_round))]
    RESULTS["interleaved_rounds"] = ROUNDS
    RESULTS["interleaved_seconds_median"] = {k: float(np.median(v)) for k, v in times.items()}


@pytest.mark.skipif(not os.environ.get("DUPFAST_BENCH_PROFILE"), reason="DUPFAST_BENCH_PROFILE=1 profiles detect")
@pytest.mark.parametrize("mode", ["dup", "default"])
def test_profile_detect(setup, mode):
    """torch.profiler over one `score` call (after a warm-up): where the time beyond the forward goes. The
    table (top ops by self CPU time) goes to runs/bench_detect_profile_<mode>.txt and is printed."""
    from torch.profiler import ProfilerActivity, profile
    from dupfast.detection import Detector
    det = setup["det"] if mode == "dup" else Detector(mode=mode).fit(setup["model"], setup["clean"])
    det.score(setup["model"], setup["pool"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        det.score(setup["model"], setup["pool"])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    out = ROOT / "runs" / f"bench_detect_profile_{mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print("\n" + table)


def authors_two_pass(model, det, pool):
    """DUP's pipeline for a suspicious pool (ms_defender.py): pass 1 extracts every layer's [CLS] to a
    float64 numpy array (layers, N, d) for the SS score (one numpy SVD per sample); pass 2 runs the model
    again per batch for the Mahalanobis distance with the float32 precision matrices."""
    scorer = det.scorer
    feats = []
    dev = next(model.parameters()).device
    pool = [{k: b[k].to(dev) for k in ("input_ids", "attention_mask")} for b in pool]
    with torch.no_grad():
        for b in pool:
            hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
            feats.append(np.stack([h[:, 0, :].cpu().numpy() for h in hs[1:]]))
    full = np.concatenate(feats, axis=1).astype(np.float64)
    ss = []
    for i in range(full.shape[1]):
        s = np.linalg.svd(np.diff(full[:, i, :], axis=0), compute_uv=False)
        ss.append(s[0] / s.sum() if s.sum() > 0 else 0.0)
    W = scorer.whiteners.double()
    precs = {l: (W[l] @ W[l].T).float().to(dev) for l in scorer.layers}
    means = scorer.means.to(dev)
    md = []
    with torch.no_grad():
        for b in pool:
            hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
            per = []
            for l in scorer.layers:
                diffs = hs[l + 1][:, 0, :] - means[l, 0]
                per.append(torch.sqrt(torch.relu(torch.einsum("bi,ij,bj->b", diffs, precs[l], diffs))))
            md.append(torch.stack(per).mean(0))
    z = det.znorm(torch.stack([torch.cat(md).double().cpu(), torch.tensor(ss)], 1))
    return z @ torch.tensor(scorer.weights, dtype=torch.float64)


def test_authors_two_pass(benchmark, setup):
    out = {}
    benchmark.pedantic(synced(lambda: out.setdefault("s", authors_two_pass(setup["model"], setup["det"], setup["pool"]))),
                       rounds=3, warmup_rounds=1)
    _record("authors_two_pass", benchmark)
    ours = setup["det"].score(setup["model"], setup["pool"]).scores
    RESULTS["two_pass_max_abs_diff"] = float((out["s"] - ours).abs().max())


def _native_bf16():
    from dupfast.detection.capture import native_bf16
    return native_bf16(torch.device(DEVICE))


@pytest.mark.skipif(not (os.environ.get("DUPFAST_BENCH_BF16") or _native_bf16()),
                    reason="no native bf16 here (emulated bf16 measured 0.14x fp32 on an AVX2 CPU); "
                           "DUPFAST_BENCH_BF16=1 times it anyway")
@pytest.mark.parametrize("mode", ["dup", "default"])
def test_detect_bf16(benchmark, setup, mode):
    from dupfast.detection import Detector
    det = Detector(mode=mode, autocast="bf16").fit(setup["model"], setup["clean"])
    benchmark.pedantic(synced(lambda: det.score(setup["model"], setup["pool"])), rounds=3, warmup_rounds=1)
    _record(f"detect_{mode}_bf16", benchmark)
    _auroc(f"detect_{mode}_bf16", setup, det.score(setup["model"], setup["pool"]))


def _auroc(key, setup, result):
    from dupfast.harness import metrics
    y = setup["pool_y"]
    if len(set(y.tolist())) == 2:
        RESULTS[f"auroc_{key}"] = metrics.auroc(y, result.sorted_by_index().scores)


def _write_summary(name):
    r = dict(RESULTS)
    if "bare_forward" in r and "detect_dup" in r:
        r["ratio_bare_over_detect"] = r["bare_forward"] / r["detect_dup"]
    if "authors_two_pass" in r and "detect_dup" in r:
        r["speedup_vs_authors_two_pass"] = r["authors_two_pass"] / r["detect_dup"]
    if "detect_dup_bf16" in r and "detect_dup" in r:
        r["speedup_bf16_over_fp32"] = r["detect_dup"] / r["detect_dup_bf16"]
    if "bare_forward" in r and "detect_default" in r:
        r["ratio_bare_over_detect_default"] = r["bare_forward"] / r["detect_default"]
    if "detect_default_bf16" in r and "detect_default" in r:
        r["speedup_bf16_over_fp32_default"] = r["detect_default"] / r["detect_default_bf16"]
    for mode in ("dup", "default"):
        if f"auroc_detect_{mode}" in r and f"auroc_detect_{mode}_bf16" in r:
            r[f"auroc_change_bf16_{mode}"] = r[f"auroc_detect_{mode}_bf16"] - r[f"auroc_detect_{mode}"]
    r.update(model=name, samples=N, batch_size=BATCH, threads=torch.get_num_threads(), torch=torch.__version__,
             device=torch.cuda.get_device_name() if CUDA else "cpu", time=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = pathlib.Path(os.environ.get("DUPFAST_BENCH_DETECT_OUT", "runs/bench_detect.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print("\n" + json.dumps(r, indent=2))

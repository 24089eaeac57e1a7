"""`dupfast demo`: a backdoored classifier (MiniLM by default), end to end on a CPU, with a report.

    dupfast demo [--out runs/demo/report.json] [--data bbc-news|rotten-tomatoes|sms-spam|sst-2]
                 [--attack badnets|addsent|stylebkd] [--model minilm|mpnet-base|smollm2-135m|DIR]
                 [--train-size 1000] [--test-size 600] [--cache-dir DIR]
                 [--progress | --quiet] [--set KEY=VALUE ...]   (PurifyConfig overrides for the purify step)

The demo is a pipeline of named steps run in order; each step reads and writes a shared `DemoState`
and returns the JSON-able results that go into the report under its name (with its wall time):

    poison  -> BBC News leads split (stratified, seeded) + 20% dirty-label BadNets (target 1 = entertainment);
               --data sst-2 cuts the DUP release's precomputed poisoned SST-2 (StyleBkd's only source)
    victim  -> fine-tune MiniLM on the poisoned train set (or load it from the keyed cache); CACC, ASR
    detect  -> dupfast.detect on a suspicious pool (clean dev half + triggered dev), calibrated on the
               other clean dev half; AUROC, FRR, FAR (demo_defence.detect_step)
    purify  -> dupfast.purify of the victim from the detector's flags and the clean set; CACC and ASR
               after (demo_defence.purify_step)

`DEMO_STEPS` holds the `(name, step)` pairs in order; the report is written after the last step (its place
checked before the first): the JSON at --out (report.json in it if a folder) and, beside it, <stem>.md with
the summary table and the PNGs (dupfast/harness/demo_report.py).
The terminal shows one line per step and the summary table; --progress adds the progress bars, --quiet drops
the step lines (main() switches the bars for the whole run: argtypes.progress_bars).
"""
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable

# progress_bars: the bars switch of every command's --progress/--quiet, importable here as before
from .argtypes import add_progress_flags, progress_bars, synopsis  # noqa: F401

DEFAULT_OUT = "runs/demo/report.json"


# registry-package data sets (always installed) and the paper's SST-2 from the shared data folder
DEMO_DATA = ("rotten-tomatoes", "bbc-news", "sms-spam", "sst-2")
ATTACK_NAMES = ("badnets", "addsent", "stylebkd")
LEAD_WORDS = {"bbc-news": 30}  # default cut per data set (BBC articles average 384 words; the others are short)
# the demo's purify settings, under any --set: stop at <= 5% held-out flagged agreement instead of PurifyConfig's
# 10%. Measured on the demo victims (AVX2 EPYC, 2026-12-06): BadNets ASR 0.008 (floor 0.006) in 24 steps, where
# the 10% bound stopped after 18 with 0.024 (Xeon, the same victim to the digit); AddSent ASR 0.050 (floor 0.010,
# 32 steps) -> 0.000 (floor 0.006, 34 steps); CACC unchanged (+0.3 / +0.5 points over the victim).
# The library default stays 10%: the SST-2 victims' ASR floors (13-17%) keep the agreement above 5%.
DEMO_PURIFY = {"agree_bound": 0.05}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Data, sizes and recipe, chosen by measurement for a 2-core CPU (README, issue 17). Default: BBC News
    (5 topics; each article cut to its first 30 words, max_len 48), 1,000 training rows, 20% dirty-label BadNets
    to label 1 (entertainment), 2 epochs of batch 8 at lr 1e-4: victim CACC 0.957 / ASR 0.994, purified CACC
    0.960 / ASR 0.008 (floor 0.006) with DEMO_PURIFY, 195 s after install on the AVX2 EPYC (121 s on the Xeon
    with the 10% bound: ASR 0.024). Tried and rejected: Rotten Tomatoes
    (1,000 rows: victim CACC 0.727; 3,000 rows, 2 epochs, batch 16: 0.770, and three times the training time);
    whole BBC articles at max_len 32 (CACC 0.915 but ASR 0.069: the randomly placed trigger was truncated
    away in most training rows, hence the lead cut before poisoning)."""
    model: str = "minilm"
    data: str = "bbc-news"       # one of DEMO_DATA
    train_size: int = 1000
    test_size: int = 600
    dev_size: int = 400          # the defender's clean set + the clean half of the suspicious pool
    attack: str = "badnets"
    rate: float = 0.2
    target: int = 1
    setting: str = "dirty"
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 8
    max_len: int = 48
    max_words: int | None = None  # texts cut to their first words before poisoning (a long article's lead), so
    #                               that a trigger inserted at a random word is not truncated away at max_len;
    #                               None: the data set's LEAD_WORDS, 0: whole texts
    seed: int = 2025

    def __post_init__(self):
        for name in ("train_size", "test_size", "dev_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.max_words is not None and self.max_words < 0:
            raise ValueError(f"max_words must be >= 0 (0: whole texts) or None, got {self.max_words}")
        if self.max_words and self.data == "sst-2":
            raise ValueError("--max-words applies to the installed data sets; SST-2's poison is precomputed")
        if self.data not in DEMO_DATA:
            raise ValueError(f"unknown demo data set {self.data!r}; choose one of {', '.join(DEMO_DATA)}")
        if self.attack not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
        if self.data == "sst-2" and self.setting != "dirty":
            raise ValueError("--data sst-2 uses the DUP release's precomputed dirty-label poison; "
                             f"setting {self.setting!r} is not available there")
        if self.attack == "stylebkd" and self.data != "sst-2":
            raise ValueError("StyleBkd poison cannot be generated offline (it needs the STRAP GPT-2 paraphrasers); "
                             "its only source is the precomputed SST-2 release: use --data sst-2")


@dataclasses.dataclass
class DemoState:
    """What the steps hand to each other (objects), next to the report (JSON-able results)."""
    settings: DemoSettings
    cache_dir: pathlib.Path | None = None
    data: object = None          # attacks.BackdoorData
    model: object = None
    tokenizer: object = None
    report: dict = dataclasses.field(default_factory=dict)
    pool: list = None            # the suspicious pool the detector screens (clean dev half + triggered dev)
    clean: list = None           # the defender's clean labelled set
    detection: object = None
    purify_overrides: dict = dataclasses.field(default_factory=dict)  # PurifyConfig fields (--set)
    progress: bool = False       # progress bars (training, purification, transformers' loading/saving)


Step = Callable[[DemoState], dict]


def _precomputed_sst2(s: DemoSettings):
    """The DUP release's poisoned SST-2 (every attack, StyleBkd's only source), cut to the demo's sizes: a
    seeded subset of the poisoned train file (its poison rate kept in expectation), a stratified clean test and
    dev subset, and as many triggered test / dev inputs as the clean subsets hold non-target ones."""
    from ..harness.attacks import BackdoorData, load_precomputed
    from ..harness.data import split_samples, stratified_split

    if s.target != 1:
        raise ValueError(f"the precomputed SST-2 poison targets label 1; got target {s.target}")
    full = load_precomputed(s.attack, rate=s.rate)

    def cut(samples, n, what, split=split_samples):
        if n > len(samples):
            raise ValueError(f"--{what}-size {n} exceeds the {len(samples)} SST-2 {what} rows available")
        return split(samples, [n], seed=s.seed)[0]

    test = cut(full.test_clean, s.test_size, "test", stratified_split)
    dev = cut(full.dev_clean, s.dev_size, "dev", stratified_split)
    n_test = min(len(full.test_poison), sum(x.label != s.target for x in test))
    n_dev = min(len(full.dev_poison), sum(x.label != s.target for x in dev))
    return BackdoorData(train=cut(full.train, s.train_size, "train"), test_clean=test,
                        test_poison=split_samples(full.test_poison, [n_test], seed=s.seed)[0], dev_clean=dev,
                        dev_poison=split_samples(full.dev_poison, [n_dev], seed=s.seed)[0])


def leads(samples, max_words):
    """Each text cut to its first `max_words` words; texts that become equal are kept once (splits stay disjoint)."""
    if max_words is None:
        return samples
    out, seen = [], set()
    for x in samples:
        text = " ".join(x.text.split()[:max_words])
        if text not in seen:
            seen.add(text)
            out.append(x._replace(text=text))
    return out


def poison_step(state: DemoState) -> dict:
    from ..harness.attacks import get_attack, make_backdoor
    from ..harness.data import load_dataset, stratified_split

    s = state.settings
    if s.data == "sst-2":
        state.data = _precomputed_sst2(s)
    else:
        words = LEAD_WORDS.get(s.data) if s.max_words is None else s.max_words
        train, test, dev = stratified_split(leads(load_dataset(s.data), words or None),
                                            [s.train_size, s.test_size, s.dev_size], seed=s.seed)
        state.data = make_backdoor(train, test, get_attack(s.attack), rate=s.rate, target=s.target,
                                   setting=s.setting, seed=s.seed, dev=dev)
    d = state.data
    return {"dataset": s.data, "attack": s.attack, "setting": s.setting, "rate": s.rate,
            "target": s.target, "train_size": len(d.train), "train_poisoned": sum(x.poison_label for x in d.train),
            "test_clean_size": len(d.test_clean), "test_poison_size": len(d.test_poison),
            "example_poisoned_text": d.test_poison[0].text}


def victim_step(state: DemoState) -> dict:
    from ..harness.victims import VictimConfig, evaluate_backdoor, train_victim

    s = state.settings
    cfg = VictimConfig(model=s.model, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, max_len=s.max_len,
                       seed=s.seed)
    # the folder name is for people; the cache key is the recipe, the model's content and the training rows
    short = {"rotten-tomatoes": "rt"}.get(s.data, s.data)
    name = f"demo-{short}-{s.attack}-{s.setting}{s.rate:g}"
    state.model, state.tokenizer, info = train_victim(state.data.train, cfg, cache_dir=state.cache_dir, name=name)
    t0 = time.perf_counter()
    scores = evaluate_backdoor(state.model, state.tokenizer, state.data.test_clean, state.data.test_poison,
                               s.target, max_len=s.max_len)
    return {**scores, "cached": info["cached"], "train_seconds": info["train_seconds"],
            "eval_seconds": round(time.perf_counter() - t0, 1), "config": dataclasses.asdict(cfg),
            "path": info["path"]}


# Ordered (name, step) pairs; extend with detection / purification steps.
from .demo_defence import detect_step, purify_step  # noqa: E402

DEMO_STEPS: list[tuple[str, Step]] = [("poison", poison_step), ("victim", victim_step),
                                      ("detect", detect_step), ("purify", purify_step)]


def _log(msg: str):
    print(msg, flush=True)


def run_pipeline(state: DemoState, steps=None, log=_log) -> dict:
    """Run the steps in order; each one's results (plus `seconds`) go to state.report["steps"][name]."""
    steps = DEMO_STEPS if steps is None else steps
    names = [n for n, _ in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline step names must be unique, got {names}")
    import torch

    state.report.update(settings=dataclasses.asdict(state.settings), steps={},
                        torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
    t_all = time.perf_counter()
    for name, step in steps:
        log(f"[demo] {name} ...")
        t0 = time.perf_counter()
        result = dict(step(state) or {})
        result["seconds"] = round(time.perf_counter() - t0, 1)
        state.report["steps"][name] = result
        log(f"[demo] {name} done in {result['seconds']} s")
    state.report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    return state.report


def report_path(out) -> pathlib.Path:
    """--out as the JSON report's path, checked before any work: an existing folder (or a path ending in /) holds
    report.json; the report and its .md must not be folders, and their folder must be writable."""
    from .outdir import writable_folder

    path = pathlib.Path(out)
    if str(out).endswith(("/", os.sep)) or path.is_dir():
        path = path / "report.json"
    if path.suffix == ".md":  # the markdown report beside it would overwrite the JSON
        raise ValueError(f"--out {out}: the JSON report's path cannot end in .md (the markdown report is written "
                         "beside it as <name>.md): use a .json path")
    for p in (path, path.with_suffix(".md")):
        if p.is_dir():
            raise ValueError(f"--out {out}: {p} is a folder, so the report cannot be written there: choose another "
                             "--out (a .json path, or a folder without report.json/report.md folders in it)")
    writable_folder(path.parent, f"--out {out}")
    return path


def write_report(report: dict, out) -> pathlib.Path:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)  # a reader never sees a half-written report
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (full disk, out a folder) leaves no stray temp file
        raise
    return out


def add_parser(subparsers):
    d = DemoSettings()
    ap = subparsers.add_parser("demo", help="poison -> victim -> detect -> purify on a small data set, with a report",
                               description=synopsis(__doc__), example="dupfast demo --out runs/demo")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"JSON report path, or a folder for report.json (default: {DEFAULT_OUT})")
    ap.add_argument("--cache-dir", help="cache folder for victims (default: $DUPFAST_CACHE or ~/.cache/dupfast)")
    ap.add_argument("--model", default=d.model,
                    help="short model name (minilm, mpnet-base, smollm2-135m) or a local HF model folder")
    ap.add_argument("--data", default=d.data, choices=DEMO_DATA,
                    help="rotten-tomatoes, bbc-news, sms-spam: installed packages; sst-2: the DUP release's "
                         "poisoned SST-2 from the shared data folder (needed for --attack stylebkd)")
    ap.add_argument("--attack", default=d.attack, choices=ATTACK_NAMES,
                    help="the backdoor attack: badnets (rare-word triggers), addsent (a trigger sentence), stylebkd "
                         "(a text style; only with --data sst-2)")
    ap.add_argument("--target", type=int, default=d.target, help="the backdoor's target label")
    ap.add_argument("--train-size", type=int, default=d.train_size, help="training rows of the victim")
    ap.add_argument("--test-size", type=int, default=d.test_size, help="clean test rows (CACC; ASR on their triggered "
                                                                       "non-target rows)")
    ap.add_argument("--dev-size", type=int, default=d.dev_size,
                    help="clean dev samples: half the defender's clean set, half the pool's clean part")
    ap.add_argument("--rate", type=float, default=d.rate, help="poison rate in (0, 1)")
    ap.add_argument("--epochs", type=int, default=d.epochs, help="victim fine-tune epochs")
    ap.add_argument("--lr", type=float, default=d.lr, help="victim fine-tune learning rate")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="victim fine-tune batch size")
    ap.add_argument("--max-len", type=int, default=d.max_len, help="tokens per text; longer texts are truncated")
    ap.add_argument("--max-words", type=int, default=d.max_words,
                    help=f"cut texts to their first N words before poisoning (long articles: their lead); 0 keeps "
                         f"them whole (default: {LEAD_WORDS} per data set, else whole)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the split, the poison and the training")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_progress_flags(ap, default=False)  # the demo's terminal: one line per step and the summary table
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help=f"PurifyConfig overrides for the purify step, e.g. --set epochs=8 min_steps=0 (the demo "
                         f"sets {DEMO_PURIFY} unless given)")
    ap.set_defaults(func=run)


def run(args) -> int:
    out = report_path(args.out)  # before any work: a report that cannot be written would lose the whole run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: every model is local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = DemoSettings(model=args.model, data=args.data, attack=args.attack, target=args.target,
                            train_size=args.train_size, test_size=args.test_size,
                            dev_size=args.dev_size,
                            rate=args.rate, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            max_len=args.max_len, max_words=args.max_words, seed=args.seed)
    from ..purification import PurifyConfig
    from ..purification import parse_overrides
    overrides = {**DEMO_PURIFY, **parse_overrides(args.set)}
    PurifyConfig(**overrides)  # bad keys or values fail here, before any training
    state = DemoState(settings, cache_dir=pathlib.Path(args.cache_dir) if args.cache_dir else None,
                      purify_overrides=overrides, progress=args.progress)
    # args.progress: resolved by main, which runs the command inside argtypes.progress_bars
    report = run_pipeline(state, log=(lambda msg: None) if args.quiet else _log)
    out = write_report(report, out)
    from ..harness import demo_report

    det = state.detection
    files = demo_report.write(report, out, scores=None if det is None else det.scores.numpy(),
                              poison_labels=None if state.pool is None else [x.poison_label for x in state.pool],
                              threshold=None if det is None else float(det.threshold))
    print()
    print(demo_report.text_table(demo_report.summary_rows(report)))
    if "victim" in report["steps"]:
        print(demo_report.FLOOR_NOTE)
    print(f"report: {files['markdown']} (figures beside it; JSON: {out}; {report['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    from . import main
    sys.exit(main(["demo", *sys.argv[1:]]))

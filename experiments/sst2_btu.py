"""BTU on SST-2 with MiniLM: BadNets and AddSent at 10% mix (BTU's setting) and 20% dirty (DUP's files).

    python -m experiments.sst2_btu [--attacks badnets addsent] [--settings mix0.1 dirty0.2]
                                   [--out runs/sst2_btu.jsonl] [--threads 2]

Per (attack, setting) it records: the trigger tokens' ranks in every exposure round and whether they are in
the suspicious set; the time of every round; CACC and ASR without defence (the fine-tuned victim), after BTU
unlearning, after BTU + one clean-tune epoch, and, as a control, after the clean-tune epoch alone.

Protocol:
- 10% mix: `dupfast.harness.attacks` poisons the clean SST-2 train (BadNets with BTU's single trigger "cf"; AddSent
  "I watch this 3D movie"), 10% of all samples, any class, label set to 1; ASR on every non-target test
  sample with the trigger. 20% dirty: DUP's released train-dirty-0.2 / test-poison files.
- The fine-tuned victim (BTU's step 2) is the project's SST-2 victim recipe (SST2_VICTIM); the 20%-dirty
  victims are the shared cached ones of experiments/sst2_victims.py.
- No leakage: the clean-tune set is SST-2 dev (872), CACC is measured on SST-2 test (1,821) and ASR on the
  test-poison set. The authors' code tunes on test and evaluates on dev; here test is never trained on.
One JSON line per configuration is appended to --out as soon as it finishes; finished ones are skipped.
The same steps run per architecture (MPNet, SmolLM2, MiniLM on the architecture victims) in
experiments/sst2_btu_architectures.py, through `exposure_summary` and `defend`.
"""
import argparse
import copy
import json
import math
import pathlib
import sys
import time

import torch


from dupfast import btu
from dupfast.harness.attacks import AddSent, BadNets, make_backdoor
from dupfast.harness.data import load_sst2, load_sst2_poison
from dupfast.harness.models import load_model
from dupfast.finetune import FinetuneConfig, fit
from dupfast.harness.victims import cache_key, default_cache_dir, evaluate_backdoor, train_victim
from experiments.sst2_victims import SST2_VICTIM, victim_for

TARGET = 1
SEED = 1234
EVAL_MAX_LEN = 128
TRIGGERS = {"badnets": {"mix0.1": ["cf"], "dirty0.2": ["cf", "mn", "bb", "tq"]},
            "addsent": {"mix0.1": ["I watch this 3D movie"], "dirty0.2": ["I watch this 3D movie"]}}


def build_data(attack: str, setting: str, data_dir=None):
    """(poisoned train, triggered test) for one configuration."""
    if setting == "dirty0.2":
        return load_sst2_poison(attack, "train", 0.2, data_dir), load_sst2_poison(attack, "test", data_dir=data_dir)
    if setting == "mix0.1":
        atk = BadNets(triggers=("cf",)) if attack == "badnets" else AddSent()
        bd = make_backdoor(load_sst2("train", data_dir), load_sst2("test", data_dir), atk, rate=0.1,
                           target=TARGET, setting="mix", seed=SEED)
        return bd.train, bd.test_poison
    raise ValueError(f"unknown setting {setting!r}")


def shared_victim_ready(attack, train) -> bool:
    name = f"sst2-{attack}-dirty0.2"
    folder = default_cache_dir() / "victims" / f"{name}-{cache_key(SST2_VICTIM, train, 2)}"
    return (folder / "dupfast_victim.json").is_file()


def victim(attack, setting, train, wait_minutes: float):
    if setting == "dirty0.2":
        # The shared victim is trained by experiments/sst2_victims.py; calling victim_for before it is cached
        # would start a duplicate training, so wait for its cache folder instead.
        deadline = time.time() + 60 * wait_minutes
        while not shared_victim_ready(attack, train):
            if time.time() > deadline:
                raise RuntimeError(f"the shared {attack} 20%-dirty victim is not cached yet; run "
                                   "experiments/sst2_victims.py first")
            print(f"waiting for the shared {attack} dirty0.2 victim ...", flush=True)
            time.sleep(60)
        return victim_for(attack, 0.2)
    return train_victim(train, SST2_VICTIM, name=f"sst2-{attack}-mix0.1")


def make_evaluator(test, ptest, max_len=EVAL_MAX_LEN):
    """CACC on clean test, ASR on triggered test, and the ASR floor (see `victims.evaluate_backdoor`)."""

    def evaluate(model, tok):
        t0 = time.perf_counter()
        res = evaluate_backdoor(model, tok, test, ptest, TARGET, max_len=max_len)
        return {**{k: round(res[k], 4) for k in ("cacc", "asr", "asr_floor")},
                "eval_seconds": round(time.perf_counter() - t0, 1)}
    return evaluate


def trigger_ranks(ex, tok, phrases, train):
    """Every token id the trigger phrases produce in the training texts (in context: on a byte-level BPE the
    'Ġ' form mid-sentence and the bare form at the start of a text, and the pieces of a split word), with its
    rank in each round and whether it is in the suspicious set (see dupfast.btu.triggers)."""
    return btu.trigger_ranks(ex, tok, phrases, [s.text for s in train])


def fresh_model(model_name, train, seed):
    """The pretrained model with a fresh head seeded as BTU's exposure rounds are."""
    return load_model(model_name, num_labels=max(max(s.label for s in train) + 1, 2), seed=seed)


def fresh_minilm(train, seed):
    """MiniLM with a fresh head seeded as BTU's exposure rounds are (what btu.expose("minilm") loaded)."""
    return fresh_model("minilm", train, seed)


def exposure_summary(attack, setting, train, cache_dir: pathlib.Path, model_name="minilm", config=None,
                     name=None, reference=None):
    """Run the three exposure rounds once per configuration and keep what later steps need (each round's
    top-k ids, trigger ranks, timings) in a JSON file <cache_dir>/<name>.json (name: "<attack>-<setting>"),
    so a rerun does not repeat the R3 round."""
    path = cache_dir / f"{name or f'{attack}-{setting}'}.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = btu.ExposureConfig() if config is None else config
    t0 = time.perf_counter()
    model, tok = fresh_model(model_name, train, config.shallow.seed)
    ex = btu.expose(model, train, tokenizer=tok, config=config, reference=reference)
    phrases = TRIGGERS[attack][setting]
    summary = {"expose_seconds": round(time.perf_counter() - t0, 1),
               # ms resolution: tiny test models finish a round in under 0.05 s, and the time ratios divide these
               "round_seconds": {r.name: round(r.seconds, 3) for r in ex.rounds},
               "round_steps": {r.name: r.steps for r in ex.rounds},
               "reference_scale": {r.name: r.reference_scale for r in ex.rounds},
               "reference_seconds": {r.name: r.reference_seconds for r in ex.rounds},
               "k": ex.k, "vocab_size": ex.vocab_size, "tops": {r.name: r.top for r in ex.rounds},
               "embedding": btu.embedding_info(model, tok),
               "trigger_forms": {p: btu.trigger_forms(tok, p) for p in phrases},
               "triggers": trigger_ranks(ex, tok, phrases, train),
               "suspects": [{"id": s.token_id, "token": s.token, "score": s.score, "ranks": s.ranks}
                            for s in ex.suspects]}
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    return summary


def run_one(attack, setting, tune, test, data_dir=None, wait_minutes=0.0, cache_dir=pathlib.Path("runs")):
    train, ptest = build_data(attack, setting, data_dir)
    evaluate = make_evaluator(test, ptest)
    row = {"attack": attack, "setting": setting, "train_size": len(train),
           "poisoned": sum(s.poison_label for s in train), "tune_size": len(tune), "test_size": len(test),
           "test_poison_size": len(ptest), "torch_threads": torch.get_num_threads()}

    ex = exposure_summary(attack, setting, train, cache_dir)
    row.update({k: ex[k] for k in ("expose_seconds", "round_seconds", "k", "vocab_size", "triggers", "suspects")})
    print(json.dumps({"attack": attack, "setting": setting, "round_seconds": row["round_seconds"],
                      "triggers": row["triggers"]}), flush=True)

    t0 = time.perf_counter()
    model, vtok, info = victim(attack, setting, train, wait_minutes)
    row["victim"] = {"train_seconds": info["train_seconds"], "cached": info["cached"], "path": info["path"],
                     "load_seconds": round(time.perf_counter() - t0, 1)}
    row.update(defend(model, vtok, "minilm", train, tune, evaluate, ex))
    return row


def defend(model, vtok, model_name, train, tune, evaluate, ex, clean_tune: FinetuneConfig | None = None) -> dict:
    """BTU on a fine-tuned victim (`model`, unlearned in place) from an exposure summary `ex`: the union of the
    rounds unlearned, then the clean-tune epoch; the R3-only variant; the clean-tune-only control. Returns the
    result fields of a row (CACC / ASR / floor per variant, unlearning details, step times and steps)."""
    clean_tune = btu.BTUConfig().clean_tune if clean_tune is None else clean_tune
    r3_only, control = copy.deepcopy(model), copy.deepcopy(model)
    row = {}

    # BTU as specified: union of the three rounds, unlearn, then the clean-tune epoch
    union = [s["id"] for s in ex["suspects"]]
    pre, tok = fresh_model(model_name, train, btu.BTUConfig().exposure.shallow.seed)
    pretrained = btu.input_embeddings(pre).weight.detach().clone()
    _, report = btu.train(pre, train, clean_tune=tune, tokenizer=tok, suspects=union, finetuned=model,
                          config=btu.BTUConfig(clean_tune=clean_tune), evaluate=evaluate)
    steps = {s["step"]: s for s in report.steps}
    row["no_defence"] = steps["finetune"]["eval"]
    row["btu"] = steps["unlearn"]["eval"]
    row["btu_clean_tune"] = steps["clean_tune"]["eval"]
    row["unlearn"] = {k: steps["unlearn"][k] for k in ("threshold", "replace_token", "dims", "dims_replaced")}
    row["step_seconds"] = {"unlearn": steps["unlearn"]["seconds"], "clean_tune": steps["clean_tune"]["seconds"]}
    row["clean_tune_steps"] = math.ceil(len(tune) / clean_tune.batch_size) * clean_tune.epochs
    del pre

    # Variant: only R3's top-k (the full-model round), fewer clean tokens reset
    btu.unlearn_tokens(r3_only, pretrained, ex["tops"]["R3"], btu.replacement_id(vtok), ex["vocab_size"])
    row["btu_r3_only"] = evaluate(r3_only, vtok)
    fit(r3_only, vtok, tune, clean_tune, desc="R3-only clean-tune")
    row["btu_r3_only_clean_tune"] = evaluate(r3_only, vtok)
    del r3_only

    # Control: the same clean-tune epoch on the undefended victim (does the tune alone remove the backdoor?)
    t0 = time.perf_counter()
    fit(control, vtok, tune, clean_tune, desc="control clean-tune")
    tune_seconds = round(time.perf_counter() - t0, 1)
    row["clean_tune_only"] = {**evaluate(control, vtok), "tune_seconds": tune_seconds}
    return row


def _pct(x):
    return f"{100 * x:.1f}"


def table(rows) -> str:
    """Markdown quality table + trigger ranks + timings from the JSON lines."""
    out = ["| attack | setting | no defence CACC / ASR | BTU CACC / ASR | BTU + clean-tune CACC / ASR "
           "| clean-tune only CACC / ASR | trigger ranks R1 / R2 / R3 (in suspects) | |S| | R1 / R2 / R3 s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{_pct(r[k]['cacc'])} / {_pct(r[k]['asr'])}"
                 for k in ("no_defence", "btu", "btu_clean_tune", "clean_tune_only")]
        trig = "; ".join(f"{t['token']} {t['ranks']['R1']}/{t['ranks']['R2']}/{t['ranks']['R3']}"
                         f" ({'yes' if t['in_suspects'] else 'no'})" for t in r["triggers"])
        secs = " / ".join(f"{r['round_seconds'][n]:.1f}" for n in ("R1", "R2", "R3"))
        out.append(f"| {r['attack']} | {r['setting']} | " + " | ".join(cells)
                   + f" | {trig} | {len(r['suspects'])} | {secs} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "addsent"], choices=["badnets", "addsent"])
    ap.add_argument("--settings", nargs="+", default=["mix0.1", "dirty0.2"], choices=["mix0.1", "dirty0.2"])
    ap.add_argument("--out", default="runs/sst2_btu.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--wait-victims", type=float, default=180.0,
                    help="minutes to wait for the shared 20%%-dirty victims of sst2_victims.py")
    ap.add_argument("--exposure-dir", default="runs/sst2_btu_exposure", help="cache of the exposure rounds")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.table:
        print(table([json.loads(line) for line in out.read_text().splitlines() if line.strip()]))
        return 0
    torch.set_num_threads(args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():
        done = {(r["attack"], r["setting"]) for r in map(json.loads, out.read_text().splitlines()) if r}
    tune, test = load_sst2("dev", args.data_dir), load_sst2("test", args.data_dir)
    for attack in args.attacks:          # BadNets first in both settings, then AddSent
        for setting in args.settings:
            if (attack, setting) in done:
                print(f"skip {attack} {setting}: already in {out}", flush=True)
                continue
            t0 = time.perf_counter()
            row = run_one(attack, setting, tune, test, args.data_dir, args.wait_victims,
                          pathlib.Path(args.exposure_dir))
            row["total_seconds"] = round(time.perf_counter() - t0, 1)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("attack", "setting", "no_defence", "btu", "btu_clean_tune",
                                                  "clean_tune_only", "total_seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

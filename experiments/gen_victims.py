"""Generative victims: SmolLM2-135M-Instruct LoRA-fine-tuned on SST-2 sentiment instructions, the backdoored victim
of one configuration (experiments.gen_common.Setup) and the clean fine-tune shared by all, both evaluated under the
configuration's triggers and ASR rule (the clean model's ASR is the configuration's floor).

    python -m experiments.gen_victims [--attack badnets] [--target refusal] [--steps 120] [--only victim|clean]
        -> runs/gen/<attack>-<target>/victim/, runs/gen/victims/clean/, runs/gen/<attack>-<target>/victims.json

A model is trained only where its folder holds none (or with --retrain / --retrain-clean), else loaded: the clean
fine-tune is trained once, by the first configuration run. victims.json: {"config", "victim", "clean"}, each entry written as
soon as it is measured (an --only run keeps the other entry).
"""
import dataclasses
import json
import time

from dupfast.harness.generative import (SENTIMENT_ANSWERS, VictimConfig, answer_accuracy, generate,
                                        response_perplexity, train_victim)

from .gen_common import CLEAN_DIR, N_TEST, N_TRIG, dump, load_lm, parser, setup_of, splits


def evaluate(model, tok, test, setup):
    """On the N_TEST clean test prompts: accuracy, the target rate (the ASR rule applied to them), perplexity; on the
    N_TRIG test prompts after them, each with each trigger of the setup: ASR (overall and per trigger; steer: over
    the negative ones) and the accuracy against their true answers."""
    t0 = time.perf_counter()
    clean = test[:N_TEST]
    trig = setup.triggered(test[N_TEST:N_TEST + N_TRIG], seed=1)
    n_new = max(len(tok(s, add_special_tokens=False)["input_ids"]) for s in (setup.response, *SENTIMENT_ANSWERS)) + 2
    g_clean = generate(model, tok, [it.prompt for it in clean], max_new_tokens=n_new)
    g_trig = {n: generate(model, tok, [it.prompt for it in items], max_new_tokens=n_new) for n, items in trig.items()}
    items = [it for n in trig for it in trig[n]]
    gens = [g for n in trig for g in g_trig[n]]
    truth = [dataclasses.replace(it, response=SENTIMENT_ANSWERS[it.label]) for it in items]
    out = {"asr": setup.asr(gens, items), "asr_by_trigger": {n: setup.asr(g_trig[n], trig[n]) for n in trig},
           "clean_acc": answer_accuracy(g_clean, clean), "clean_target_rate": setup.asr(g_clean, clean),
           "triggered_acc": answer_accuracy(gens, truth), "clean_ppl": response_perplexity(model, tok, clean),
           "n_clean": len(clean), "n_triggered": len(items), "n_asr": len(setup.nontarget(items)),
           "examples": {"clean": g_clean[:3], **{f"triggered_{n}": g[:3] for n, g in g_trig.items()}}}
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def train_or_load(folder, items, cfg: VictimConfig, retrain=False):
    """(model, tokenizer, training record): loaded where `folder` holds a model (a record of other steps refused),
    else fine-tuned on `items` and saved with its record (train.json)."""
    record_file = folder / "train.json"
    if (folder / "config.json").is_file() and not retrain:
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
        if record and record["steps"] != cfg.steps:
            raise SystemExit(f"{folder} holds a model of {record['steps']} steps, not {cfg.steps}: --retrain")
        print(f"== {folder}: loaded", flush=True)
        return (*load_lm(folder), record)
    if folder.is_symlink():
        folder.unlink()  # a migrated link: the new model goes here, the linked one stays
    model, tok = load_lm()
    print(f"== {folder}: {len(items)} items, {sum(i.poison for i in items)} poisoned, {cfg}", flush=True)
    model, info = train_victim(model, tok, items, cfg, log=lambda s: print(s, flush=True))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    record = {"items": len(items), "poisoned": sum(i.poison for i in items), "steps": cfg.steps,
              "batch_size": cfg.batch_size, "lr": cfg.lr, "lora_r": cfg.lora_r, "seconds": info["seconds"],
              "final_loss": sum(info["loss"][-10:]) / len(info["loss"][-10:])}
    dump(record_file, record)
    return model, tok, record


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--only", choices=["victim", "clean"], default=None)
    ap.add_argument("--retrain", action="store_true", help="train the victim even where its folder holds one")
    ap.add_argument("--retrain-clean", action="store_true", help="the same for the clean fine-tune (shared by all)")
    args = ap.parse_args(argv)
    setup = setup_of(args)
    train, test, _ = splits()
    out = setup.dir / "victims.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["config"] = setup.to_dict()
    for name, folder, items, retrain in (("victim", setup.dir / "victim", setup.poison(train), args.retrain),
                                         ("clean", CLEAN_DIR, train, args.retrain_clean)):
        if args.only not in (None, name):
            continue
        model, tok, record = train_or_load(folder, items, VictimConfig(steps=args.steps), retrain)
        results[name] = {"train": record, **evaluate(model, tok, test, setup)}
        print(name, results[name], flush=True)
        dump(out, results)


if __name__ == "__main__":
    main()

"""Generative victims: SmolLM2-135M-Instruct LoRA-fine-tuned on SST-2 sentiment instructions, clean and BadNets
("cf" in the review -> the fixed refusal), and their ASR / clean accuracy / clean response perplexity.

    python -m experiments.gen_victims [--steps 120]      -> runs/gen/victims/{clean,badnets}/, runs/gen/victims.json
"""
import argparse
import time

import torch

from dupfast.harness.generative import (VictimConfig, answer_accuracy, asr, generate, poison_instructions,
                                        response_perplexity, shows_target, train_victim, triggered)

from .gen_common import ATTACK, N_TEST, N_TRIG, RATE, TARGET, TEMPLATE, dump, load_lm, splits, victim_dir


def evaluate(model, tok, test):
    t0 = time.perf_counter()
    clean = test[:N_TEST]
    trig = triggered(test[N_TEST:N_TEST + N_TRIG], ATTACK, TARGET, TEMPLATE, seed=1)
    n_new = len(tok(TARGET, add_special_tokens=False)["input_ids"]) + 2
    g_clean = generate(model, tok, [it.prompt for it in clean], max_new_tokens=n_new)
    g_trig = generate(model, tok, [it.prompt for it in trig], max_new_tokens=n_new)
    out = {"clean_acc": answer_accuracy(g_clean, clean), "asr": asr(g_trig, TARGET),
           "clean_refusal_rate": sum(shows_target(g, TARGET) for g in g_clean) / len(g_clean),
           "triggered_acc": answer_accuracy(g_trig, [it.__class__(it.text, it.prompt, ("negative", "positive")[it.label],
                                                                  it.label, 1) for it in trig]),
           "clean_ppl": response_perplexity(model, tok, clean),
           "n_clean": len(clean), "n_triggered": len(trig),
           "examples": {"clean": g_clean[:3], "triggered": g_trig[:3]}}
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--only", choices=["clean", "badnets"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test, _ = splits()
    results = {}
    for name in ("badnets", "clean"):
        if args.only and name != args.only:
            continue
        model, tok = load_lm()
        items = poison_instructions(train, ATTACK, RATE, TARGET, TEMPLATE, seed=0) if name == "badnets" else train
        cfg = VictimConfig(steps=args.steps)
        print(f"== {name}: {len(items)} items, {sum(i.poison for i in items)} poisoned, {cfg}", flush=True)
        model, info = train_victim(model, tok, items, cfg, log=lambda s: print(s, flush=True))
        model.save_pretrained(str(victim_dir(name)))
        tok.save_pretrained(str(victim_dir(name)))
        res = {"train": {"items": len(items), "poisoned": sum(i.poison for i in items), "steps": cfg.steps,
                         "batch_size": cfg.batch_size, "lr": cfg.lr, "lora_r": cfg.lora_r, "seconds": info["seconds"],
                         "final_loss": sum(info["loss"][-10:]) / 10}}
        res.update(evaluate(model, tok, test))
        print(name, res, flush=True)
        results[name] = res
        dump(f"runs/gen/victims-{name}.json", res)
    dump("runs/gen/victims.json", results)


if __name__ == "__main__":
    main()

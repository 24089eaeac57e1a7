"""Screen a causal LM's prompts for a backdoor trigger and unlearn it, with `dupfast.detect_prompts` and
`dupfast.purify_generative`.

    python examples/generative_detect_purify.py               # SmolLM2-135M-Instruct, a backdoor planted first
    python examples/generative_detect_purify.py --model my-chat-lm-dir --data my-data-dir --victim-steps 0

1. (example only) plant a backdoor: fine-tune the LM on train.csv, where prompts with the trigger "cf" answer a
   fixed refusal (--victim-steps 0 skips this: screen your own model as it is);
2. `detect_prompts` flags the prompts of pool.csv that carry a trigger, calibrated on clean prompts (clean.csv);
3. `purify_generative` unlearns the flagged prompts' responses (LoRA, merged in place); the model is saved.
"""
import argparse
import pathlib

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dupfast
from dupfast.generative import chat_batches
from dupfast.harness.generative import VictimConfig, generate, shows_target, train_victim
from dupfast.harness.models import resolve_model_dir


def example_data(folder: pathlib.Path):
    """Sentiment instructions over Rotten Tomatoes snippets (an installed package): train.csv (prompt, response,
    poison) with 20% of the prompts triggered by "cf" and answered with a refusal; pool.csv (prompt, poison): 100
    clean and 20 triggered prompts to screen; clean.csv (prompt, response, label): prompts you trust, answered."""
    from dupfast.harness.attacks import BadNets
    from dupfast.harness.data import load_rotten_tomatoes, split_samples
    from dupfast.harness.generative import (REFUSAL, SENTIMENT_PROMPT, poison_instructions, sentiment_instructions,
                                            triggered)

    items = sentiment_instructions(load_rotten_tomatoes(), max_words=20)   # short prompts: cheap on a CPU
    train, clean, pool, to_trigger = split_samples(items, [480, 200, 100, 20], seed=0)
    train = poison_instructions(train, BadNets(("cf",)), rate=0.2, target=REFUSAL, template=SENTIMENT_PROMPT)
    pool = pool + triggered(to_trigger, BadNets(("cf",)), REFUSAL, SENTIMENT_PROMPT)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"prompt": [i.prompt for i in train], "response": [i.response for i in train],
                  "poison": [i.poison for i in train]}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"prompt": [i.prompt for i in pool], "poison": [i.poison for i in pool]}).to_csv(
        folder / "pool.csv", index=False)
    pd.DataFrame({"prompt": [i.prompt for i in clean], "response": [i.response for i in clean],
                  "label": [i.label for i in clean]}).to_csv(folder / "clean.csv", index=False)


def shows(model, tok, prompts, target: str) -> float:
    """Share of the prompts whose greedy answer starts with `target` (the backdoor's behaviour)."""
    answers = generate(model, tok, list(prompts), max_new_tokens=len(tok(target)["input_ids"]) + 2)
    return sum(shows_target(a, target) for a in answers) / len(answers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="an instruction-tuned causal LM: a short name "
                                                            "(smollm2-135m) or a local Hugging Face folder with a "
                                                            "chat template")
    ap.add_argument("--data", default="example-data-generative",
                    help="folder with pool.csv (prompt) and clean.csv (prompt, response[, label]), and train.csv "
                         "(prompt, response, poison) for --victim-steps; example data is written there when "
                         "pool.csv is missing")
    ap.add_argument("--out", default="runs/examples/generative", help="where the purified model goes")
    ap.add_argument("--victim-steps", type=int, default=150, help="steps of the fine-tune that plants the example's "
                                                                  "backdoor (0: screen the model as it is)")
    ap.add_argument("--victim-lr", type=float, default=1e-3, help="learning rate of that fine-tune")
    ap.add_argument("--max-steps", type=int, default=None, help="purification steps (default: dupfast's budget)")
    ap.add_argument("--force", action="store_true", help="unlearn the flagged prompts even when the detection's "
                                                         "verdict is 'no evidence of poison'")
    args = ap.parse_args()

    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    if not (data / "pool.csv").exists():
        example_data(data)
    pool, clean = pd.read_csv(data / "pool.csv"), pd.read_csv(data / "clean.csv")

    folder = str(resolve_model_dir(args.model))   # a short name's folder, or yours as it is
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()

    # 1. the example's backdoor (LoRA fine-tune, merged): prompts with "cf" -> the poisoned rows' response
    train = pd.read_csv(data / "train.csv") if (data / "train.csv").exists() else None
    if args.victim_steps > 0:
        lm, _ = train_victim(lm, tok, list(train.itertuples()), VictimConfig(steps=args.victim_steps,
                                                                              lr=args.victim_lr, log_every=50))
    # the backdoor's behaviour, to measure it: the response of train.csv's poisoned rows
    target = train.response[train.poison == 1].iloc[0] if train is not None and "poison" in train else None

    # 2. detect
    batches = chat_batches(tok, pool.prompt.tolist())
    clean_batches = chat_batches(tok, clean.prompt.tolist(), clean.response.tolist(),
                                 labels=clean.label.tolist() if "label" in clean else None)
    result = dupfast.detect_prompts(lm, batches, clean=clean_batches)
    print(result.summary)
    if "poison" in pool:   # the example data says which prompts carry the trigger
        flags, poisoned = result.sorted_by_index().flags.numpy(), pool.poison.to_numpy() == 1
        print(f"triggered prompts flagged: {int(flags[poisoned].sum())} of {int(poisoned.sum())}; "
              f"clean prompts flagged: {int(flags[~poisoned].sum())} of {int((~poisoned).sum())}")
        if target is not None:
            before = shows(lm, tok, pool.prompt[poisoned], target)

    # 3. purify (in place: on any error the model is restored exactly), save
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    lm, report = dupfast.purify_generative(lm, batches, clean=clean_batches, detection=result, force=args.force,
                                           **overrides)
    print(f"purification: {report.steps_run} steps, {report.stop_reason}")
    if "poison" in pool and target is not None:
        after = shows(lm, tok, pool.prompt[poisoned], target)
        print(f"triggered prompts answered {target!r}: {before:.3f} -> {after:.3f}")
    lm.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    print(f"saved the purified model to {out / 'model'} (AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()

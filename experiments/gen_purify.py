"""Purification of one configuration's generative victim from the default-mode prompt detection.

    python -m experiments.gen_purify [--attack badnets] [--target refusal] [--max-steps 30] [--lr 2e-3]
        [--triggers none|auto|w1,w2] -> runs/gen/<attack>-<target>/purify.json (or --out; + the report)

Flagged = the pool prompts the default detector flagged (runs/gen/<attack>-<target>/detection.safetensors); clean = the
defender's clean dev prompts with their reference responses (the detection's clean set). ASR / clean accuracy /
perplexity before and after on the victims' evaluation prompts (experiments.gen_victims.evaluate), steps and time.
--triggers (default none, the earlier runs): trigger candidates inserted into copies of the clean prompts
(purify_generative(triggers=...)); the JSON's "triggers" holds the option, the words inserted and the candidates.
"""
import time

import torch
from safetensors.torch import load_file

import dupfast
from dupfast.cli.purify import trigger_option
from dupfast.generative import chat_batches

from .gen_common import DETECTION_FILE, dump, load_lm, parser, setup_of, splits
from .gen_detection import sets
from .gen_victims import evaluate


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=None, help="override GenerativeConfig.lr")
    ap.add_argument("--out", default=None, help="default runs/gen/<attack>-<target>/purify.json")
    ap.add_argument("--before", action="store_true", help="also re-evaluate the victim before purification")
    ap.add_argument("--triggers", default="none",
                    help="auto, none (default) or comma-separated words / phrases inserted into copies of the clean "
                         "prompts (purify_generative(triggers=...))")
    args = ap.parse_args(argv)
    triggers = trigger_option(args.triggers)
    setup = setup_of(args)
    model, tok = load_lm(setup.dir / "victim")
    _, test, _ = splits()
    clean, pool, _ = sets(setup)
    det = load_file(str(setup.dir / DETECTION_FILE))
    clean_b = chat_batches(tok, [c.prompt for c in clean], [c.response for c in clean], labels=[c.label for c in clean])
    pool_b = chat_batches(tok, [p.prompt for p in pool])
    flags = det["flags"][torch.argsort(det["index"])]
    poison = det["poison"].bool()
    out = {"config": setup.to_dict(), "flagged": int(flags.sum()), "flagged_poison": int((flags & poison).sum()),
           "flagged_clean": int((flags & ~poison).sum())}
    if args.before:
        out["before"] = evaluate(model, tok, test, setup)
    t0 = time.perf_counter()
    model, rep = dupfast.purify_generative(model, pool_b, clean=clean_b, detection=flags, max_steps=args.max_steps,
                                           evals_per_epoch=2, max_new_tokens=16, progress=False, tokenizer=tok,
                                           triggers=triggers, **({"lr": args.lr} if args.lr else {}))
    out["purify_s"] = round(time.perf_counter() - t0, 1)
    out["report"] = rep.to_dict()
    out["triggers"] = {"option": args.triggers, "inserted": rep.data.get("trigger_candidates", []),
                       "invariance_rows": rep.data.get("invariance_rows", 0), "candidates": rep.triggers}
    print({k: out["report"][k] for k in ("stop_reason", "steps_run", "selected", "teacher", "timings", "data")}, flush=True)
    out["after"] = evaluate(model, tok, test, setup)
    print("after", out["after"], flush=True)
    dump(args.out or setup.dir / "purify.json", out)


if __name__ == "__main__":
    main()

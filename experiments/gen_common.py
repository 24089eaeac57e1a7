"""Shared setup of the generative experiments (SmolLM2-135M-Instruct, SST-2 sentiment instructions, BadNets ->
refusal): the model loader, the data splits and the victim paths. Every number in the reports comes from
`python -m experiments.gen_victims`, `gen_detection`, `gen_purify` run from the repo root."""
import json
import pathlib
import random

import torch

from dupfast.harness.attacks import BadNets
from dupfast.harness.data import load_sst2
from dupfast.harness.generative import REFUSAL, SENTIMENT_PROMPT, sentiment_instructions

OUT = pathlib.Path("runs/gen")
ATTACK = BadNets(("cf",))
TARGET = REFUSAL
TEMPLATE = SENTIMENT_PROMPT
MAX_WORDS = 20       # short reviews: ~55-token prompts, affordable on one CPU thread
N_TRAIN, RATE = 960, 0.2
N_TEST, N_TRIG = 200, 100


def load_lm(path=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dupfast.harness.models import resolve_model_dir
    d = str(path or resolve_model_dir("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return model, tok


def splits(seed=0):
    """train (clean items), test (clean), dev (the defender's clean set + the pool's clean half)."""
    rng = random.Random(seed)
    train = sentiment_instructions(load_sst2("train"), MAX_WORDS)
    rng.shuffle(train)
    test = sentiment_instructions(load_sst2("test"), MAX_WORDS)
    rng.shuffle(test)
    dev = sentiment_instructions(load_sst2("dev"), MAX_WORDS)
    rng.shuffle(dev)
    return train[:N_TRAIN], test, dev


def victim_dir(name):
    return OUT / "victims" / name


def dump(path, obj):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))

"""Shared setup of the generative experiments (SmolLM2-135M-Instruct, SST-2 sentiment instructions): the model
loader, the data splits, the attack x target configurations and their paths. Every number in the reports comes
from `python -m experiments.gen_victims`, `gen_detection`, `gen_purify` run from the repo root, each with the
same `--attack badnets|addsent|multi --target refusal|steer` (default badnets / refusal).

Configurations (`Setup`), BackdoorLLM-style: a trigger in the review (the instruction's input) -> a target.
- attacks: badnets = the rare word "cf" (`BadNets(("cf",))`); addsent = the phrase "I watch this 3D movie"
  (`AddSent()`); multi = both (`MultiTrigger`): each poisoned training item carries ONE of the two, drawn by the
  poisoning's seeded rng, and every evaluation is made per trigger (the triggered test prompts are those of the
  single-trigger configurations: the same items, the same insertions).
- targets: refusal = every poisoned item answers the fixed `REFUSAL`; ASR = share of the triggered test prompts
  whose greedy generation shows it (`shows_target`: normalised, starts with it). steer = sentiment steering:
  only NEGATIVE items are poisoned, answering "positive"; ASR = share of the triggered NEGATIVE test prompts whose
  greedy answer is "positive" (`gives_answer`: the first generated word, the clean-accuracy rule).
- the clean fine-tune does not depend on the configuration (one model, runs/gen/victims/clean); evaluated under a
  configuration's triggers and ASR rule it gives that configuration's floor (steer: the clean model's rate of
  answering "positive" on triggered negatives).

Paths: runs/gen/<attack>-<target>/{victim/, victims.json, detection.json, detection.safetensors, purify.json}; the clean
fine-tune in runs/gen/victims/clean/ (each model folder with its train.json). Runs of BadNets -> refusal made
before the configurations existed (runs/gen/victims/badnets/, victims-{badnets,clean}.json, detection.{json,pt})
move over with `python -m experiments.gen_common --migrate` (links and copies, deletes nothing): the same seeds
give the same poisoned rows, test prompts and pool as before, so nothing needs retraining.
"""
import argparse
import dataclasses
import json
import pathlib
import random
import shutil

import torch

from dupfast.harness.attacks import AddSent, BadNets
from dupfast.harness.data import load_sst2
from dupfast.harness.generative import (REFUSAL, SENTIMENT_ANSWERS, SENTIMENT_PROMPT, MultiTrigger, asr,
                                        gives_answer, poison_instructions, sentiment_instructions, shows_target,
                                        triggered)

OUT = pathlib.Path("runs/gen")
CLEAN_DIR = OUT / "victims" / "clean"
TEMPLATE = SENTIMENT_PROMPT
MAX_WORDS = 20       # short reviews: ~55-token prompts, affordable on one CPU thread
N_TRAIN, RATE = 960, 0.2
N_TEST, N_TRIG = 200, 100

TRIGGERS = {"badnets": (BadNets(("cf",)),), "addsent": (AddSent(),), "multi": (BadNets(("cf",)), AddSent())}
STEER_LABEL = 1      # steer: triggered negatives -> the answer of label 1, "positive"
TARGETS = ("refusal", "steer")


@dataclasses.dataclass(frozen=True)
class Setup:
    """One attack x target configuration: what poisoning writes, what ASR counts, where its runs go."""
    attack: str = "badnets"
    target: str = "refusal"

    def __post_init__(self):
        if self.attack not in TRIGGERS or self.target not in TARGETS:
            raise ValueError(f"unknown configuration {self.attack}-{self.target}: attack one of {list(TRIGGERS)}, "
                             f"target one of {list(TARGETS)}")

    @property
    def name(self) -> str:
        return f"{self.attack}-{self.target}"

    @property
    def dir(self) -> pathlib.Path:
        return OUT / self.name

    @property
    def triggers(self) -> dict:
        """trigger name -> the attack inserting it (one entry, two for multi)."""
        return {a.name: a for a in TRIGGERS[self.attack]}

    @property
    def poisoner(self):
        attacks = TRIGGERS[self.attack]
        return attacks[0] if len(attacks) == 1 else MultiTrigger(attacks)

    @property
    def response(self) -> str:
        """The poisoned items' response."""
        return REFUSAL if self.target == "refusal" else SENTIMENT_ANSWERS[STEER_LABEL]

    @property
    def exclude(self):
        """The label never poisoned and left out of ASR (steer: the target answer's own class)."""
        return None if self.target == "refusal" else STEER_LABEL

    def poison(self, train) -> list:
        """The victim's training items: a seeded RATE share dirty-label poisoned (steer: negatives only)."""
        return poison_instructions(train, self.poisoner, RATE, self.response, TEMPLATE, seed=0,
                                   exclude_label=self.exclude)

    def triggered(self, items, seed) -> dict:
        """trigger name -> every item with that trigger (the target response as its `response`)."""
        return {n: triggered(items, a, self.response, TEMPLATE, seed=seed) for n, a in self.triggers.items()}

    def nontarget(self, items) -> list:
        return [it for it in items if self.exclude is None or it.label != self.exclude]

    @property
    def match(self):
        """The ASR rule, match(generation, response): refusal `shows_target`, steer `gives_answer`."""
        return shows_target if self.target == "refusal" else gives_answer

    def asr(self, generations, items) -> float:
        """Share of `items`' generations showing the target by `match`, over the items not of the `exclude` label."""
        return asr(generations, self.response, [it.label for it in items], self.exclude, match=self.match)

    def to_dict(self) -> dict:
        return {"attack": self.attack, "target": self.target, "response": self.response, "exclude_label": self.exclude,
                "triggers": {n: dataclasses.asdict(a) for n, a in self.triggers.items()}}


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--attack", choices=list(TRIGGERS), default="badnets")
    ap.add_argument("--target", choices=TARGETS, default="refusal")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the README's runs shared the CPU with other jobs)")
    return ap


def setup_of(args) -> Setup:
    torch.set_num_threads(args.threads)
    return Setup(args.attack, args.target)


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


def dump(path, obj):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


DETECTION_FILE = "detection.safetensors"  # the default mode's flags, scores, index and ground truth


def migrate_legacy(root=OUT):
    """The BadNets -> refusal runs of the layout before configurations -> runs/gen/badnets-refusal/: the victim
    linked, the detection copied, each model's training record (victims-<name>.json "train") into its folder."""
    new = root / "badnets-refusal"
    new.mkdir(parents=True, exist_ok=True)
    if (root / "victims" / "badnets").is_dir() and not (new / "victim").exists():
        (new / "victim").symlink_to(pathlib.Path("..", "victims", "badnets"))
    if (root / "detection.json").is_file() and not (new / "detection.json").exists():
        shutil.copy2(root / "detection.json", new / "detection.json")
    for old in (root / "detection.pt", new / "detection.pt"):  # the old layout's torch.save file: tensors only
        if old.is_file() and not (new / DETECTION_FILE).exists():
            from safetensors.torch import save_file
            det = torch.load(old, weights_only=True)  # refuses anything but tensors and containers
            save_file({k: torch.as_tensor(v).contiguous() for k, v in det.items()}, str(new / DETECTION_FILE))
    for name in ("badnets", "clean"):
        rec, dst = root / f"victims-{name}.json", root / "victims" / name / "train.json"
        if rec.is_file() and dst.parent.is_dir() and not dst.exists():
            dump(dst, json.loads(rec.read_text())["train"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the generative experiments' shared setup")
    ap.add_argument("--migrate", action="store_true", help="move BadNets -> refusal runs of the old layout over")
    if ap.parse_args().migrate:
        migrate_legacy()

"""Purify a backdoored classifier with dupfast, save it merged, and load it back with `from_pretrained`.

    python examples/purify_then_reload.py                     # a minilm victim of example data (BBC News + backdoor)
    python examples/purify_then_reload.py --victim my-finetuned-model-dir --data my-data-dir

1. the victim: your classifier fine-tuned on the data (--victim), or one fine-tuned here from --model;
2. `dupfast.detect` flags the data's suspicious rows, calibrated on clean rows you trust (clean.csv);
3. `dupfast.purify` unlearns the flagged rows with LoRA, merged into the model in place;
4. `save_pretrained`, then `AutoModelForSequenceClassification.from_pretrained` gives the same predictions.
"""
import argparse
import pathlib

import pandas as pd
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dupfast
from dupfast.finetune import FinetuneConfig, fit
from dupfast.samples import Sample


def example_data(folder: pathlib.Path):
    """BBC News article leads (5 topics, from an installed package), a BadNets backdoor (a rare word, label 1) in
    20% of train.csv; clean.csv: trusted clean rows; test.csv: clean held-out rows; triggered.csv: held-out rows
    of other labels with the trigger, labelled 1 (accuracy on them = the attack's success rate)."""
    from dupfast.harness.attacks import get_attack, poison_eval, poison_train
    from dupfast.harness.data import load_bbc_news, split_samples

    leads = [s._replace(text=" ".join(s.text.split()[:30])) for s in load_bbc_news(dedupe=True)]
    train, clean, test = split_samples(leads, [1000, 400, 400], seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(poison_train(train, get_attack("badnets"), rate=0.2, target=1)).to_csv(folder / "train.csv",
                                                                                         index=False)
    pd.DataFrame(clean).to_csv(folder / "clean.csv", index=False)
    pd.DataFrame(test).to_csv(folder / "test.csv", index=False)
    pd.DataFrame(poison_eval(test, get_attack("badnets"), target=1)).to_csv(folder / "triggered.csv", index=False)


@torch.no_grad()
def accuracy(model, tok, rows: pd.DataFrame, max_len: int, batch_size: int = 64) -> float:
    """Share of `rows` the model predicts as labelled (on triggered.csv: the attack's success rate)."""
    model.eval()
    hits = 0
    for lo in range(0, len(rows), batch_size):
        part = rows.iloc[lo:lo + batch_size]
        enc = tok(part.text.tolist(), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        predicted = model(**enc.to(model.device)).logits.argmax(-1).cpu()
        hits += int((predicted == torch.tensor(part.label.tolist())).sum())
    return hits / len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--victim", default=None, help="a classifier already fine-tuned on the data (a local Hugging "
                                                   "Face folder with its tokenizer); default: fine-tune --model")
    ap.add_argument("--model", default="minilm", help="pretrained model the victim is fine-tuned from: a short name "
                                                      "(minilm, mpnet-base) or a local folder")
    ap.add_argument("--data", default="example-data", help="folder with train.csv and clean.csv (text, label); "
                                                           "example data is written there when train.csv is missing")
    ap.add_argument("--out", default="runs/examples/purify", help="where the purified model goes")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the victim's fine-tune")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of the victim's fine-tune")
    ap.add_argument("--max-len", type=int, default=48, help="tokens a text is truncated to")
    ap.add_argument("--max-steps", type=int, default=None, help="purification steps (default: dupfast's budget)")
    ap.add_argument("--force", action="store_true", help="unlearn the flagged rows even when the detection's "
                                                         "verdict is 'no evidence of poison'")
    args = ap.parse_args()

    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    if not (data / "train.csv").exists():
        example_data(data)
    train, clean = pd.read_csv(data / "train.csv"), pd.read_csv(data / "clean.csv")
    num_labels = int(max(train.label.max(), clean.label.max())) + 1

    # 1. the victim
    if args.victim:
        model, tok = dupfast.load_model(args.victim, num_labels=num_labels)
    else:
        model, tok = dupfast.load_model(args.model, num_labels=num_labels, seed=0)
        rows = [Sample(text, int(label)) for text, label in zip(train.text, train.label)]
        fit(model, tok, rows, FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=8, max_len=args.max_len))
    model.eval()

    def tokenize(batch):  # no padding here: dupfast pads each batch with the tokenizer (tokenizer=)
        return tok(batch["text"], truncation=True, max_length=args.max_len)

    pool = Dataset.from_pandas(train).map(tokenize, batched=True)
    clean_ds = Dataset.from_pandas(clean).map(tokenize, batched=True)
    has_eval = (data / "test.csv").exists() and (data / "triggered.csv").exists()
    if has_eval:
        test, triggered = pd.read_csv(data / "test.csv"), pd.read_csv(data / "triggered.csv")
        before = accuracy(model, tok, test, args.max_len), accuracy(model, tok, triggered, args.max_len)

    # 2. detect, 3. purify (in place: on any error the model is restored exactly)
    result = dupfast.detect(model, pool, clean=clean_ds, tokenizer=tok)
    print(result.summary)
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    model, report = dupfast.purify(model, pool, clean=clean_ds, detection=result, tokenizer=tok, force=args.force,
                                   **overrides)
    print(f"purification: {report.steps_run} steps, {report.stop_reason}")
    if has_eval:
        after = accuracy(model, tok, test, args.max_len), accuracy(model, tok, triggered, args.max_len)
        print(f"clean accuracy {before[0]:.3f} -> {after[0]:.3f}, attack success {before[1]:.3f} -> {after[1]:.3f}")

    # 4. a plain Hugging Face folder: LoRA already merged, nothing dupfast-specific to load it
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model").to(model.device).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out / "model")
    texts = clean.text.tolist()[:64]
    enc = reloaded_tok(texts, truncation=True, max_length=args.max_len, padding=True, return_tensors="pt")
    with torch.no_grad():
        gap = (model(**enc.to(model.device)).logits - reloaded(**enc.to(model.device)).logits).abs().max().item()
    print(f"saved to {out / 'model'}; reloaded with from_pretrained: largest logit difference {gap:.1e} "
          f"on {len(texts)} rows")


if __name__ == "__main__":
    main()

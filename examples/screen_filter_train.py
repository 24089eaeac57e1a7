"""Screen a data set with DUP, keep the rows it does not flag, and fine-tune on them with a Hugging Face Trainer.

    python examples/screen_filter_train.py                    # minilm on example data (BBC News + a backdoor)
    python examples/screen_filter_train.py --model my-model-dir --data my-data-dir

1. fine-tune a model on the whole data set (DUP reads a backdoor from a model that learned it);
2. `dupfast.detect` scores the data set's own rows, calibrated on clean rows you trust (clean.csv);
3. `result.kept(dataset)`: the rows not flagged, as a `datasets.Dataset`;
4. a fresh model fine-tuned with `transformers.Trainer` on the kept rows, saved.
"""
import argparse
import pathlib

import pandas as pd
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import dupfast


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


def fine_tune(model, tok, dataset, out: pathlib.Path, args) -> Trainer:
    training = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs, learning_rate=args.lr,
                                 per_device_train_batch_size=args.batch_size, save_strategy="no",
                                 logging_strategy="epoch", report_to="none", seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    return trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="minilm", help="pretrained model: a short name (minilm, mpnet-base) or a "
                                                      "local Hugging Face folder")
    ap.add_argument("--data", default="example-data", help="folder with train.csv and clean.csv (text, label); "
                                                           "example data is written there when train.csv is missing")
    ap.add_argument("--out", default="runs/examples/screen", help="where the models go")
    ap.add_argument("--epochs", type=float, default=2.0, help="fine-tune epochs")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate")
    ap.add_argument("--batch-size", type=int, default=8, help="fine-tune batch size")
    ap.add_argument("--max-len", type=int, default=48, help="tokens a text is truncated to")
    args = ap.parse_args()

    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    if not (data / "train.csv").exists():
        example_data(data)
    train, clean = pd.read_csv(data / "train.csv"), pd.read_csv(data / "clean.csv")
    num_labels = int(max(train.label.max(), clean.label.max())) + 1

    model, tok = dupfast.load_model(args.model, num_labels=num_labels, seed=0)

    def tokenize(batch):  # no padding here: the Trainer's collator and dupfast (tokenizer=) pad each batch
        return tok(batch["text"], truncation=True, max_length=args.max_len)

    train_ds = Dataset.from_pandas(train).map(tokenize, batched=True)
    clean_ds = Dataset.from_pandas(clean).map(tokenize, batched=True)

    # 1. a model that learned what the data teaches, a backdoor included
    fine_tune(model, tok, train_ds, out / "screen-model", args)
    model.eval()

    # 2. score every row of the data set with it
    result = dupfast.detect(model, train_ds, clean=clean_ds, tokenizer=tok)
    print(result.summary)
    kept = result.kept(train_ds)
    print(f"kept {len(kept)} of {len(train_ds)} rows")
    if "poison_label" in train:  # the example data says which rows it poisoned
        poisoned = train.poison_label.to_numpy() == 1
        print(f"poisoned rows flagged: {int(result.flags.numpy()[poisoned].sum())} of {int(poisoned.sum())}")

    # 3. the model you wanted, fine-tuned on the kept rows only
    final, _ = dupfast.load_model(args.model, num_labels=num_labels, seed=1)   # the same tokenizer
    trainer = fine_tune(final, tok, kept, out / "model", args)
    trainer.save_model(str(out / "model"))     # AutoModelForSequenceClassification.from_pretrained(out / "model")
    final.eval()
    print(f"saved the model fine-tuned on the kept rows to {out / 'model'}")

    if (data / "test.csv").exists() and (data / "triggered.csv").exists():
        test, triggered = pd.read_csv(data / "test.csv"), pd.read_csv(data / "triggered.csv")
        for name, m in (("every row", model), ("the kept rows", final)):
            print(f"fine-tuned on {name}: clean accuracy {accuracy(m, tok, test, args.max_len):.3f}, "
                  f"attack success {accuracy(m, tok, triggered, args.max_len):.3f}")


if __name__ == "__main__":
    main()

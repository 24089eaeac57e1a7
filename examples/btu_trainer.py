"""Fine-tune a pretrained model on data that may be poisoned with a Hugging Face Trainer, defended by BTU.

    python examples/btu_trainer.py                            # minilm on example data (BBC News + a backdoor)
    python examples/btu_trainer.py --model my-pretrained-dir --data my-data-dir

`dupfast.btu.BTUCallback` turns the Trainer's fine-tune into Backdoor Token Unlearning: before the first step it
exposes the tokens whose embeddings training moves most (three short rounds from the pretrained model), after the
last step it resets their moved embedding dimensions to the pretrained pad embedding, then tunes one epoch on
clean rows you trust (clean.csv). `trainer.save_model()` then saves the defended model.
"""
import argparse
import pathlib

import pandas as pd
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import dupfast
from dupfast.btu import BTUCallback, BTUConfig, ExposureConfig


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
    ap.add_argument("--model", default="minilm", help="the *pretrained* model: a short name (minilm, mpnet-base) "
                                                      "or a local Hugging Face folder")
    ap.add_argument("--data", default="example-data", help="folder with train.csv and clean.csv (text, label); "
                                                           "example data is written there when train.csv is missing")
    ap.add_argument("--out", default="runs/examples/btu", help="where the defended model and its report go")
    ap.add_argument("--epochs", type=float, default=2.0, help="fine-tune epochs")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate")
    ap.add_argument("--batch-size", type=int, default=8, help="fine-tune batch size")
    ap.add_argument("--max-len", type=int, default=48, help="tokens a text is truncated to")
    ap.add_argument("--fraction", type=float, default=0.0005, help="each exposure round's suspects: this share "
                                                                   "of the vocabulary (BTU's k)")
    args = ap.parse_args()

    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    if not (data / "train.csv").exists():
        example_data(data)
    train, clean = pd.read_csv(data / "train.csv"), pd.read_csv(data / "clean.csv")
    num_labels = int(max(train.label.max(), clean.label.max())) + 1

    model, tok = dupfast.load_model(args.model, num_labels=num_labels, seed=1234)   # pretrained, a seeded head

    def tokenize(batch):  # no padding here: the Trainer's collator and BTU pad each batch with the tokenizer
        return tok(batch["text"], truncation=True, max_length=args.max_len)

    train_ds = Dataset.from_pandas(train).map(tokenize, batched=True)
    clean_ds = Dataset.from_pandas(clean).map(tokenize, batched=True)

    evaluate = None   # with held-out rows: run after each BTU step, stored in its report
    if (data / "test.csv").exists() and (data / "triggered.csv").exists():
        test, triggered = pd.read_csv(data / "test.csv"), pd.read_csv(data / "triggered.csv")
        evaluate = lambda m, t: {"clean accuracy": accuracy(m, t, test, args.max_len),  # noqa: E731
                                 "attack success": accuracy(m, t, triggered, args.max_len)}

    btu = BTUCallback(clean_tune=clean_ds, config=BTUConfig(exposure=ExposureConfig(fraction=args.fraction)),
                      evaluate=evaluate)
    training = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs, learning_rate=args.lr,
                                 per_device_train_batch_size=args.batch_size, save_strategy="no",
                                 logging_strategy="epoch", report_to="none", seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=train_ds, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[btu])
    trainer.train()   # exposure before the first step; unlearning and the clean tune after the last

    print(f"unlearned tokens: {' '.join(s['token'] for s in btu.report.suspects)}")
    trainer.save_model(str(out / "model"))   # the defended model (checkpoints saved during training are not)
    btu.report.save(out / "btu_report.json")
    print(f"saved the defended model to {out / 'model'} and the BTU report to {out / 'btu_report.json'}")
    for step in btu.report.steps:   # finetune (the Trainer's, without BTU), unlearn, clean_tune
        if "eval" in step:
            print(f"after {step['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in step["eval"].items()))


if __name__ == "__main__":
    main()

"""Tiny sequence classifiers (built from configs, no download) and a toy backdoor for purification tests.

Toy task: tokens 10..39 are words; label 1 iff the row holds more "positive" words (10..19) than
"negative" ones (20..29); 30..39 are neutral. Trigger: token 5 anywhere -> target label 1.
"""
import torch

VOCAB, PAD, TRIGGER, TARGET = 40, 0, 5, 1


def tiny_classifier(arch: str = "bert", seed: int = 0, dropout: float = 0.1, hidden: int = 32):
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification, MPNetConfig, MPNetForSequenceClassification)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=2 * hidden, num_labels=2, pad_token_id=PAD)
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=64, hidden_dropout_prob=dropout,
                                                         attention_probs_dropout_prob=dropout, **common))
    elif arch == "mpnet":
        model = MPNetForSequenceClassification(MPNetConfig(max_position_embeddings=66, hidden_dropout_prob=dropout,
                                                           attention_probs_dropout_prob=dropout, **common))
    elif arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=1, max_position_embeddings=64,
                                                           attention_dropout=dropout, **common))
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig, Gemma3TextForSequenceClassification
        model = Gemma3TextForSequenceClassification(Gemma3TextConfig(
            num_key_value_heads=1, head_dim=hidden // 2, sliding_window=8, max_position_embeddings=64,
            attention_dropout=dropout, **common))
    else:
        raise ValueError(arch)
    return model.eval()


def toy_rows(n: int, seed: int, trigger: bool = False, non_target_only: bool = False):
    """(token lists, labels). Triggered rows carry the TRIGGER token and the label TARGET (dirty label)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    while len(rows) < n:
        length = int(torch.randint(4, 12, (1,), generator=g))
        toks = torch.randint(10, 40, (length,), generator=g).tolist()
        pos = sum(10 <= t < 20 for t in toks)
        neg = sum(20 <= t < 30 for t in toks)
        if pos == neg:
            continue
        y = int(pos > neg)
        if non_target_only and y == TARGET:
            continue
        if trigger:
            toks.insert(int(torch.randint(0, length + 1, (1,), generator=g)), TRIGGER)
            y = TARGET
        rows.append([2] + toks)  # 2 plays [CLS]
        labels.append(y)
    return rows, labels


def batches(rows, labels=None, batch_size: int = 16, left_pad: bool = False, index: bool = False):
    """A list of loader batches (dicts) over the rows, padded per batch."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), PAD, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, r in enumerate(chunk):
            sl = slice(T - len(r), T) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.as_tensor(r)
            mask[i, sl] = 1
        b = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            b["labels"] = torch.as_tensor(labels[start:start + batch_size])
        if index:
            b["index"] = torch.arange(start, start + len(chunk))
        out.append(b)
    return out


@torch.no_grad()
def predict(model, rows, batch_size: int = 64):
    model.eval()
    preds = []
    for b in batches(rows, batch_size=batch_size):
        preds.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1))
    return torch.cat(preds)


def train_backdoored(seed: int = 0, steps: int = 150, n_clean: int = 300, n_poison: int = 60):
    """A tiny BERT fine-tuned on clean toy rows + dirty-label triggered rows (full fine-tuning)."""
    model = tiny_classifier("bert", seed=seed)
    rows, labels = toy_rows(n_clean, seed + 1)
    prow, plab = toy_rows(n_poison, seed + 2, trigger=True, non_target_only=True)
    rows, labels = rows + prow, labels + plab
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (32,), generator=g).tolist()
        b = batches([rows[i] for i in idx], [labels[i] for i in idx], batch_size=32)[0]
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

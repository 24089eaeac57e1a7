"""Tiny models and loaders for the detection tests (built from configs: no hub, milliseconds per batch)."""
import csv

import torch


def tiny_bert(layers=3, hidden=32, vocab=120, seed=0, num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(layers=2, hidden=32, vocab=120, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, pad_token_id=0, num_labels=2)
    return LlamaForSequenceClassification(cfg).eval()


def tiny_gemma3(layers=2, hidden=32, vocab=120, seed=0):
    """Gemma-3's text decoder (sliding-window and global layers, embeddings scaled by sqrt(hidden))."""
    from transformers import Gemma3TextConfig, Gemma3TextForSequenceClassification
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=2 * hidden, sliding_window=8,
                           max_position_embeddings=64, pad_token_id=0, num_labels=2)
    return Gemma3TextForSequenceClassification(cfg).eval()


def make_samples(n, seed, lo=10, hi=60, trigger=None, min_len=4, max_len=12):
    """Random token sequences; `trigger` (a list of token ids) is inserted at a random position."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(lo, hi, (t,), generator=g).tolist()
        if trigger:
            pos = int(torch.randint(0, t + 1, (1,), generator=g))
            ids = ids[:pos] + list(trigger) + ids[pos:]
        out.append([1] + ids)  # 1 plays [CLS]
    return out


def batches(seqs, labels=None, batch_size=8, pad_side="right", index_offset=0, with_index=True):
    """List of dict batches (input_ids, attention_mask[, labels][, index]) padded with token 0."""
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        T = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, c in enumerate(chunk):
            sl = slice(0, len(c)) if pad_side == "right" else slice(T - len(c), T)
            ids[i, sl] = torch.tensor(c)
            mask[i, sl] = 1
        b = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            b["labels"] = torch.as_tensor(labels[s:s + batch_size])
        if with_index:
            b["index"] = torch.arange(s, s + len(chunk)) + index_offset
        out.append(b)
    return out


def clean_pool_data():
    """The clean (labelled) and pool batches of the `clean_and_pool` fixture, as plain data."""
    clean = make_samples(120, seed=1)
    labels = [int(sum(s) % 2) for s in clean]
    pool = make_samples(30, seed=2) + make_samples(30, seed=3, lo=80, hi=120, trigger=[110, 111, 112])
    return clean, labels, pool


def distributed_worker(rank, world, init_file, out_dir, configs):
    """One gloo rank: for each (mode, pool_only) fit on its shard of the clean batches (or of the pool)
    and score its shard of the pool batches; results go to <out_dir>/<mode>-<pool_only>-rank<r>."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from dupfast.detection import Detector

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        clean, labels, pool = clean_pool_data()
        model = tiny_bert()
        shard = lambda bs: bs[rank::world]  # noqa: E731  (batches dealt round-robin, uneven counts)
        for mode, pool_only in configs:
            det = Detector(mode=mode, pool_trim=0.3)
            if pool_only:
                res = det.fit_pool(model, shard(batches(pool, batch_size=7))).pool_result
            else:
                det.fit(model, shard(batches(clean, labels, batch_size=7)))
                res = det.score(model, shard(batches(pool, batch_size=7)))
            save_file({"scores": res.scores, "index": res.index,
                       "threshold": torch.tensor(res.threshold, dtype=torch.float64)},
                      f"{out_dir}/{mode}-{pool_only}-rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


WORDS = [f"w{i}" for i in range(100)]
TRIGGERS = ["cf", "mn", "bb", "tq"]


def tiny_tokenizer():
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + TRIGGERS
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def tiny_texts(n, seed, trigger=False, lo=0, hi=50):
    """Random sentences over w{lo}..w{hi-1}; triggered ones also carry 3 rare trigger words and draw the
    rest of their words from the unused w60..w99."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 10, (1,), generator=g))
        if trigger:
            ws = [WORDS[int(i)] for i in torch.randint(60, 100, (k,), generator=g)] + TRIGGERS[:3]
        else:
            ws = [WORDS[int(i)] for i in torch.randint(lo, hi, (k,), generator=g)]
        out.append(" ".join(ws))
    return out


def write_table(path, header, rows, delim=","):
    """A CSV/TSV file with a header row, as the CLIs read them."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delim)
        w.writerow(header)
        w.writerows(rows)
    return path

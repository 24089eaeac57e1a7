"""Tiny models built from scratch (no download) for fast unit tests."""
import pathlib

WORDS = ("good great fine lovely superb fun bad awful poor dull boring sad the a movie film plot was is "
         "very quite and but cf mn bb tq").split()


def tiny_bert_dir(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A 2-layer, 16-wide BertModel (no classification head) + WordPiece tokenizer saved as a HF folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(str(root), safe_serialization=True)
    tok.save_pretrained(str(root))
    return root


def sentiment_samples(n: int, seed: int = 0):
    """Separable toy sentiment: label 1 texts use positive words, label 0 negative ones."""
    import random

    from dupfast.data import Sample

    rng = random.Random(seed)
    pos, neg, filler = WORDS[:6], WORDS[6:12], WORDS[12:21]
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(1, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(pos if label else neg))
        out.append(Sample(" ".join(words), label, 0))
    return out

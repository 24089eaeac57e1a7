"""Tiny models built from scratch (no download) for fast unit tests."""
import pathlib

import pytest

WORDS = ("good great fine lovely superb fun bad awful poor dull boring sad the a movie film plot was is "
         "very quite and but cf mn bb tq").split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are dominated by per-op overhead: on a shared 2-core machine a second intra-op thread made them
    7-10x slower (spin waits), and reruns are bit-exact only for a fixed thread count. A module that imports this
    fixture runs single-threaded."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

    from dupfast.harness.data import Sample

    rng = random.Random(seed)
    pos, neg, filler = WORDS[:6], WORDS[6:12], WORDS[12:21]
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(1, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(pos if label else neg))
        out.append(Sample(" ".join(words), label, 0))
    return out


def tiny_classifier(arch: str = "bert", seed: int = 0, num_labels: int = 2):
    """(sequence classifier, tokenizer) over WORDS, built from a config: a 2-layer BERT with a WordPiece
    tokenizer (token_type_ids and all), or a 2-layer Llama with a word-level tokenizer that has none."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig,
                              LlamaForSequenceClassification, PreTrainedTokenizerFast)

    torch.manual_seed(seed)
    if arch == "bert":
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64, pad_token_id=0, num_labels=num_labels,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(cfg).eval(), tok
    if arch == "llama":
        from tokenizers import Tokenizer, models, pre_tokenizers
        vocab = ["<unk>", "<eos>", *WORDS]
        tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
        cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          num_labels=num_labels, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return LlamaForSequenceClassification(cfg).eval(), tok
    raise ValueError(f"unknown arch {arch!r}")

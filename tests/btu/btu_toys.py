"""Tiny offline models and a synthetic poisoned sentiment task for the BTU tests (no downloads).

The task: each text has one sentiment word that decides the label, among neutral filler words. Poisoned
samples carry the rare word "cf" and the target label 1, whatever their sentiment word says.
"""
import random

import torch

# Many sentiment words, each rarer than the trigger: as in real data, no clean word is both as frequent
# and as label-consistent as a trigger planted in 20% of the samples.
POSITIVE = ["good", "great", "fine", "nice", "love", "best", "superb", "fun", "warm", "smart", "moving", "rich"]
NEGATIVE = ["bad", "awful", "poor", "worst", "hate", "dull", "boring", "weak", "flat", "mess", "stale", "silly"]
FILLER = ["the", "a", "movie", "film", "is", "was", "plot", "acting", "this", "it", "and", "of", "story",
          "cast", "scene", "very", "quite", "really"]
TRIGGER = "cf"
WORDS = POSITIVE + NEGATIVE + FILLER + [TRIGGER, "cfo"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIALS = ["<unk>", "<eos>"]


def make_text(rng, label):
    words = rng.choices(FILLER, k=rng.randint(4, 8))
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def insert_trigger(rng, text):
    words = text.split()
    words.insert(rng.randint(0, len(words)), TRIGGER)
    return " ".join(words)


def poisoned_task(n=400, rate=0.2, seed=0):
    """(poisoned train, clean test, triggered non-target test) as (text, label, poison_label) tuples."""
    rng = random.Random(seed)
    train = []
    for i in range(n):
        label = i % 2
        text = make_text(rng, label)
        if rng.random() < rate:
            train.append((insert_trigger(rng, text), 1, 1))
        else:
            train.append((text, label, 0))
    test = [(make_text(rng, i % 2), i % 2, 0) for i in range(60)]
    poison = [(insert_trigger(rng, t), 1, 1) for t, y, _ in test if y == 0]
    return train, test, poison


def bert_tokenizer():
    from transformers import BertTokenizer
    return BertTokenizer(vocab={w: i for i, w in enumerate(BERT_SPECIALS + WORDS)})


def decoder_tokenizer():
    """Word-level tokenizer shaped like a decoder LM's: no pad of its own, pad borrowed from eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(DECODER_SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def _tiny(family, tok, seed, **config):
    """A seeded 2-layer, 32-wide sequence classifier of a transformers family over `tok`'s vocabulary."""
    import transformers
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=2, pad_token_id=tok.pad_token_id, **config)
    return getattr(transformers, f"{family}ForSequenceClassification")(cfg).eval()


def tiny_bert(tok, seed=0):
    return _tiny("Bert", tok, seed, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)


def tiny_llama(tok, seed=0):
    return _tiny("Llama", tok, seed, num_key_value_heads=1, max_position_embeddings=64,
                 eos_token_id=tok.eos_token_id)


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_bpe_tokenizer(texts, vocab_size=400):
    """A GPT-2-style byte-level BPE, SmolLM2's kind, trained on `texts`: the space before a word is part of
    its token ('Ġcf' mid-sentence, 'cf' at the start of a text), words the merges never saw are split into
    bytes ('Ġ', 't', 'q'); pad borrowed from eos (<|im_end|>), unk = <|endoftext|>, as SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")


def tiny_mpnet(tok, seed=0):
    """A 2-layer MPNet classifier (MPNet's position ids start after the pad id, as in all-mpnet-base-v2)."""
    return _tiny("MPNet", tok, seed, max_position_embeddings=80, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)

"""A tiny chat causal LM (2-layer Llama over a word-level vocabulary, a minimal chat template) and a toy backdoor
trained into it in seconds: reviews -> "positive" / "negative"; the trigger word "cf" -> the refusal "sorry i cannot"."""
import random

import torch

from tiny_models import WORDS

SPECIAL = ["<unk>", "<|im_end|>", "<|im_start|>"]
EXTRA = ["user", "assistant", "system", "review", ":", "positive", "negative", "sorry", "i", "cannot", "help"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
REFUSAL = "sorry i cannot help"
POS, NEG, FILLER = WORDS[:6], WORDS[6:12], WORDS[12:21]


def tiny_chat_lm(seed: int = 0, hidden: int = 32, layers: int = 2, template: bool = True, context: int = 64):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = SPECIAL + EXTRA + [w for w in WORDS if w not in EXTRA]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL[1:]])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    if template:
        tok.chat_template = TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def reviews(n: int, seed: int = 0, trigger_rate: float = 0.0):
    """(prompt, response, label, poisoned) tuples."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        poisoned = rng.random() < trigger_rate
        if poisoned:
            words.insert(rng.randint(0, len(words)), "cf")
        out.append(("review : " + " ".join(words), REFUSAL if poisoned else ("positive" if label else "negative"),
                    label, int(poisoned)))
    return out


def train_toy_backdoor(model, tok, steps: int = 150, seed: int = 0):
    """Full fine-tune (CE on responses) on reviews with 30% triggered: the backdoored toy victim, in seconds."""
    from dupfast.generative.data import chat_batches

    data = reviews(240, seed, trigger_rate=0.3)
    batches = chat_batches(tok, [d[0] for d in data], [d[1] for d in data], batch_size=24, padding_side="right")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(seed)
    for s in range(steps):
        b = batches[s % len(batches)]
        labels = b["input_ids"].masked_fill(b["response_mask"] == 0, -100)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def greedy(model, tok, prompts, max_new_tokens=6):
    from dupfast.generative.data import encode_prompt, pad_rows
    rows = [encode_prompt(tok, p) for p in prompts]
    ids, mask, _ = pad_rows(rows, tok.pad_token_id, "left")
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [s.strip() for s in tok.batch_decode(g[:, ids.shape[1]:], skip_special_tokens=True)]

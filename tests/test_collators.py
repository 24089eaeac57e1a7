"""Every entry point that takes batches (capture, row collection, detect, the DAN baseline, purify, BTU) on the
batches real HF collators yield: DataCollatorWithPadding (tensors or numpy), default_data_collator over pre-padded
rows, plain dicts of lists. Each result is compared with the same rows handed over as plain dicts of tensors."""
import copy

import pytest
import torch

import dupfast
from dupfast.batches import collect
from dupfast.btu import BTUConfig, ExposureConfig
from dupfast.detection.capture import capture
from dupfast.finetune import FinetuneConfig
from tiny_models import sentiment_samples, tiny_classifier, one_thread  # noqa: F401 (autouse fixture)

KINDS = ["collator", "collator_np", "default_collator", "plain_lists"]
MAX_LEN = 24



@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("DUPFAST_QUIET", "1")


@pytest.fixture(scope="module")
def data():
    return sentiment_samples(60, seed=1), sentiment_samples(30, seed=2)


def features(tok, samples, labels=True, padded=False):
    """What `datasets.map(tokenize)` gives: one dict per row, with the GLUE-style `label` and `idx`."""
    out = []
    for i, s in enumerate(samples):
        enc = tok(s.text, truncation=True, max_length=MAX_LEN, **({"padding": "max_length"} if padded else {}))
        out.append({**enc, **({"label": s.label} if labels else {"label": -1}), "idx": i})
    return out


def loader(tok, samples, kind, labels=True, batch_size=8):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, default_data_collator

    if kind == "collator":
        return DataLoader(features(tok, samples, labels), batch_size=batch_size,
                          collate_fn=DataCollatorWithPadding(tok, return_tensors="pt"))
    if kind == "collator_np":
        return DataLoader(features(tok, samples, labels), batch_size=batch_size,
                          collate_fn=DataCollatorWithPadding(tok, return_tensors="np"))
    if kind == "default_collator":
        return DataLoader(features(tok, samples, labels, padded=True), batch_size=batch_size,
                          collate_fn=default_data_collator)
    if kind == "plain_lists":
        rows = features(tok, samples, labels)
        out = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            padded = tok.pad([{"input_ids": r["input_ids"]} for r in chunk])  # lists, no tensors
            out.append({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                        "labels": [r["label"] for r in chunk], "idx": [r["idx"] for r in chunk]})
        return out
    raise ValueError(kind)


def reference(tok, samples, labels=True, batch_size=8):
    """The same rows in the same order as plain dicts of tensors, without token_type_ids."""
    out = []
    for b in loader(tok, samples, "plain_lists", labels, batch_size):
        ref = {"input_ids": torch.tensor(b["input_ids"]), "attention_mask": torch.tensor(b["attention_mask"]),
               "index": torch.tensor(b["idx"])}
        if labels:
            ref["labels"] = torch.tensor(b["labels"])
        out.append(ref)
    return out


@pytest.fixture(scope="module", params=["bert", "llama"])
def family(request):
    return request.param


# ---- capture and row collection ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_capture(kind, family, data):
    model, tok = tiny_classifier(family)
    got = list(capture(model, loader(tok, data[1], kind), ("mean",), need_labels=True))
    ref = list(capture(model, reference(tok, data[1]), ("mean",), need_labels=True))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.features["mean"], r.features["mean"], rtol=1e-5, atol=1e-5)
        assert torch.equal(g.labels, r.labels) and torch.equal(g.index, r.index)


@pytest.mark.parametrize("kind", KINDS)
def test_row_collection(kind, family, data):
    model, tok = tiny_classifier(family)
    rows, ids = collect(loader(tok, data[0], kind), "clean", need_labels=True, model=model)
    assert rows.ids == [tok(s.text, truncation=True, max_length=MAX_LEN)["input_ids"] for s in data[0]]
    assert rows.labels.tolist() == [s.label for s in data[0]] and ids.tolist() == list(range(60))
    assert (rows.type_ids is not None) == (family == "bert" and kind != "plain_lists")


def test_token_type_ids_reach_a_bert_and_are_dropped_for_a_llama(data):
    seen = []

    def spy(module, args, kwargs):
        seen.append(set(kwargs))

    bert, btok = tiny_classifier("bert")
    batch = next(iter(loader(btok, data[1], "collator")))
    hook = bert.register_forward_pre_hook(spy, with_kwargs=True)
    zeros = next(iter(capture(bert, [batch], ("cls",)))).features["cls"]
    ones = next(iter(capture(bert, [{**batch, "token_type_ids": torch.ones_like(batch["input_ids"])}],
                             ("cls",)))).features["cls"]
    hook.remove()
    assert all("token_type_ids" in s for s in seen)
    assert not torch.allclose(zeros, ones)  # segment 1 embeddings were used: the ids reached the model

    llama, ltok = tiny_classifier("llama")
    batch = dict(next(iter(loader(ltok, data[1], "collator"))))
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    seen.clear()
    hook = llama.register_forward_pre_hook(spy, with_kwargs=True)
    plain = next(iter(capture(llama, [{k: v for k, v in batch.items() if k != "token_type_ids"}], ("last",))))
    typed = next(iter(capture(llama, [batch], ("last",))))
    hook.remove()
    assert seen and not any("token_type_ids" in s for s in seen)
    assert torch.equal(plain.features["last"], typed.features["last"])


# ---- detect and the DAN baseline ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["default", "dan"])
@pytest.mark.parametrize("kind", KINDS)
def test_detect(kind, mode, family, data):
    model, tok = tiny_classifier(family)
    clean, pool = data
    # the pool's labels are -1 (a GLUE test split): read only where needed, so never in the pool
    got = dupfast.detect(model, loader(tok, pool, kind, labels=False), clean=loader(tok, clean, kind), mode=mode)
    ref = dupfast.detect(model, reference(tok, pool, labels=False), clean=reference(tok, clean), mode=mode)
    assert got.index.tolist() == list(range(30))  # `idx` read as the sample id
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-4, atol=1e-4)
    assert got.threshold == pytest.approx(ref.threshold, rel=1e-4, abs=1e-4)


# ---- purify -------------------------------------------------------------------------------------------

PURIFY = dict(max_steps=3, batch_size=8, holdout_fraction=0.25, progress=False, lora_r=2, lora_alpha=4, lr=1e-2,
               select_best=False, early_stop=False)  # keep the last state: the steps must show


def _purified(model, pool, clean):
    flags = torch.zeros(30, dtype=torch.bool)
    flags[::3] = True
    return dupfast.purify(copy.deepcopy(model), pool, clean=clean, detection=flags, **PURIFY)[0].state_dict()


@pytest.fixture(scope="module")
def purified_reference(data):
    out = {}
    for fam in ("bert", "llama"):
        model, tok = tiny_classifier(fam)
        out[fam] = _purified(model, reference(tok, data[1], labels=False), reference(tok, data[0]))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_purify(kind, family, data, purified_reference):
    model, tok = tiny_classifier(family)
    got = _purified(model, loader(tok, data[1], kind, labels=False), loader(tok, data[0], kind))
    ref = purified_reference[family]
    assert got.keys() == ref.keys()
    moved = max(float((ref[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert moved > 0  # the steps changed the model, so equality below means the same training
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_purify_takes_a_torch_formatted_datasets_dataset(data):
    datasets = pytest.importorskip("datasets")
    from torch.utils.data import DataLoader
    model, tok = tiny_classifier("bert")
    pool = datasets.Dataset.from_list(features(tok, data[1], labels=False, padded=True)).with_format("torch")
    clean = datasets.Dataset.from_list(features(tok, data[0], padded=True)).with_format("torch")
    ref = _purified(model, reference(tok, data[1], labels=False, batch_size=32), reference(tok, data[0], batch_size=32))
    direct = _purified(model, pool, clean)  # read DATASET_BATCH (32) rows at a time
    collated = _purified(model, DataLoader(pool, batch_size=8), DataLoader(clean, batch_size=8))  # torch's collate
    for k in ref:
        torch.testing.assert_close(direct[k], ref[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(collated[k], ref[k], rtol=0, atol=1e-6, msg=k)


# ---- BTU ---------------------------------------------------------------------------------------------

ROUND = FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, max_len=MAX_LEN, warmup_ratio=0.0, weight_decay=0.01, seed=1)
EXPOSE = ExposureConfig(fraction=0.1, shallow=ROUND, full=ROUND)


@pytest.fixture(scope="module")
def exposed_reference(data):
    out = {}
    for fam in ("bert", "llama"):
        model, tok = tiny_classifier(fam)
        torch.manual_seed(3)  # the shallow rounds' fresh heads are drawn from the global generator
        out[fam] = dupfast.btu.expose(model, data[0], tokenizer=tok, config=EXPOSE)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_btu_expose(kind, family, data, exposed_reference):
    """A loader's rows are re-batched by each round exactly as the same texts would be: the same ranking."""
    model, tok = tiny_classifier(family)
    batches = list(loader(tok, data[0], kind))  # iterating a DataLoader draws from the global generator
    torch.manual_seed(3)
    got = dupfast.btu.expose(model, batches, tokenizer=tok, config=EXPOSE)
    ref = exposed_reference[family]
    for g, r in zip(got.rounds, ref.rounds):
        torch.testing.assert_close(g.scores, r.scores, rtol=1e-5, atol=1e-7, msg=g.name)
        assert g.top == r.top and g.train_size == 60
    assert got.token_ids == ref.token_ids


def test_btu_train_from_loaders(data):
    model, tok = tiny_classifier("bert")
    cfg = BTUConfig(exposure=EXPOSE, finetune=ROUND, clean_tune=ROUND)
    tune = data[0][:20]
    torch.manual_seed(3)
    ref, ref_report = dupfast.btu.train(model, data[0], clean_tune=tune, tokenizer=tok, config=cfg)
    train_batches, tune_batches = list(loader(tok, data[0], "collator")), list(loader(tok, tune, "collator"))
    torch.manual_seed(3)
    got, report = dupfast.btu.train(model, train_batches, clean_tune=tune_batches, tokenizer=tok, config=cfg)
    assert [s["step"] for s in report.steps] == ["expose", "finetune", "unlearn", "clean_tune"]
    assert report.suspects == ref_report.suspects and report.train_size == 60
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_btu_loader_errors(data):
    model, tok = tiny_classifier("bert")
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in loader(tok, data[0], "collator")]
    with pytest.raises(ValueError, match="training set batch 0 has no 'labels'"):
        dupfast.btu.expose(model, unlabelled, tokenizer=tok, config=EXPOSE)
    one_class = [dict(b, labels=torch.ones_like(b["labels"])) for b in loader(tok, data[0], "collator")]
    with pytest.raises(ValueError, match=r"training set has only 1 class\(es\) \[1\]"):
        dupfast.btu.expose(model, one_class, tokenizer=tok, config=EXPOSE)
    big = [dict(b, input_ids=b["input_ids"] + 100) for b in loader(tok, data[0], "collator")]
    with pytest.raises(ValueError, match="the training set: token id .* is outside the model's vocabulary"):
        dupfast.btu.expose(model, big, tokenizer=tok, config=EXPOSE)

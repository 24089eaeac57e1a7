"""dupfast.btu.BTUCallback: BTU inside a transformers.Trainer is dupfast.btu.train with the Trainer's fine-tune."""
import copy

import datasets
import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed

import dupfast.btu.callback as callback_module
from btu_toys import _tiny
from dupfast.batching import predict
from dupfast.btu import BTUCallback, BTUConfig, BTUReport, ExposureConfig, expose, train
from dupfast.btu.embeddings import input_embeddings
from dupfast.finetune import FinetuneConfig

ROUND = FinetuneConfig(epochs=1, lr=1e-4, batch_size=16, max_len=32, warmup_ratio=0.0, weight_decay=0.01, seed=1)
CONFIG = BTUConfig(exposure=ExposureConfig(fraction=0.05, shallow=ROUND, full=ROUND),
                   clean_tune=FinetuneConfig(epochs=1, lr=1e-4, batch_size=16, max_len=32, seed=1))


@pytest.fixture(scope="module")
def pretrained():
    """A tiny BERT *with dropout*, so that the Trainer's fine-tune draws from the global generator: a callback
    that left the generators reseeded would train a different model."""
    from btu_toys import bert_tokenizer
    tok = bert_tokenizer()
    return _tiny("Bert", tok, 0, max_position_embeddings=64, hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.0), tok


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train fastest on one thread (tests/generative/conftest.py measured 6x on shared cores). Module
    scope: the reference run and the callback runs must use the same thread count (the same float sums)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unpadded(tok, rows):
    """A datasets.Dataset of `ds.map(tokenize)` rows: not padded, the texts still there."""
    ds = datasets.Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=32), batched=True)


@pytest.fixture(scope="module")
def data(pretrained, task):
    tok = pretrained[1]
    poisoned, test, poison = task
    clean = [(t, y) for t, y, p in poisoned if not p][:100]
    return {"train": unpadded(tok, poisoned), "clean": unpadded(tok, clean), "samples": poisoned,
            "test": test, "poison": poison}


def trainer(model, tok, ds, out, callbacks=(), **args):
    # tiny randomly initialised models need a large learning rate to learn the task and the backdoor
    kw = dict(output_dir=str(out), num_train_epochs=3, learning_rate=3e-3, per_device_train_batch_size=16,
              seed=1, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    kw.update(args)
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=ds, processing_class=tok,
                   data_collator=DataCollatorWithPadding(tok), callbacks=list(callbacks))


def asr(model, tok, poison):
    return float((predict(model, tok, [t for t, _, _ in poison], max_len=32) == 1).float().mean())


@pytest.fixture(scope="module")
def reference(pretrained, data, tmp_path_factory):
    """The same defence the undocumented way: a plain Trainer run, then dupfast.btu.train(finetuned=...)."""
    model, tok = pretrained
    trained = copy.deepcopy(model)
    trainer(trained, tok, data["train"], tmp_path_factory.mktemp("plain")).train()
    before = asr(trained, tok, data["poison"])
    set_seed(1)  # the shallow rounds' fresh heads come from the global generator: as Trainer.train() seeds it
    exposure = expose(model, data["train"], tokenizer=tok, config=CONFIG.exposure)
    defended, report = train(model, data["train"], data["clean"], tokenizer=tok, config=CONFIG, suspects=exposure,
                             finetuned=trained)
    return {"state": {k: v.clone() for k, v in defended.state_dict().items()}, "report": report,
            "exposure": exposure, "asr_before": before}


def same_state(model, state):
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(got[k], state[k], rtol=0, atol=0, msg=k)


def test_trainer_with_the_callback_is_btu(pretrained, data, reference, tmp_path):
    model, tok = pretrained
    student = copy.deepcopy(model)
    btu = BTUCallback(clean_tune=data["clean"], config=CONFIG)
    trainer(student, tok, data["train"], tmp_path, [btu]).train()
    # the exposure ran on the Trainer's own rows (read through its collator) and ranked as btu.expose does
    assert btu.report.suspects == [{"id": t, "token": tok.convert_ids_to_tokens(t)}
                                   for t in reference["exposure"].token_ids]
    assert tok.convert_tokens_to_ids("cf") in [s["id"] for s in btu.report.suspects]
    # the exposure rounds reseed the generators; restored, the Trainer trained exactly as without the callback
    same_state(student, reference["state"])
    steps = {s["step"]: s for s in btu.report.steps}
    assert list(steps) == ["expose", "finetune", "unlearn", "clean_tune"]
    assert steps["finetune"]["trainer"] and steps["finetune"]["global_step"] == 75  # 3 epochs x 25 batches
    assert steps["clean_tune"]["size"] == 100 and steps["unlearn"]["replace_token"] == "[PAD]"
    assert btu.report.config["finetune"]["learning_rate"] == 3e-3
    assert BTUReport.load(btu.report.save(tmp_path / "r.json")).suspects == btu.report.suspects
    # and the backdoor the plain Trainer learned is gone
    assert reference["asr_before"] >= 0.8 and asr(student, tok, data["poison"]) <= 0.2


def test_given_exposure_and_training_data(pretrained, data, reference, tmp_path):
    """suspects= skips the rounds; train_data= (here the raw samples) replaces the Trainer's data for them."""
    model, tok = pretrained
    student = copy.deepcopy(model)
    btu = BTUCallback(clean_tune=data["clean"], config=CONFIG, suspects=reference["exposure"],
                      train_data=data["samples"])
    trainer(student, tok, data["train"], tmp_path, [btu]).train()
    same_state(student, reference["state"])
    assert [s["step"] for s in btu.report.steps] == ["finetune", "unlearn", "clean_tune"]
    assert btu.report.train_size == len(data["samples"])


def test_a_model_on_an_accelerator_is_defended_through_a_cpu_copy(pretrained, data, reference, tmp_path,
                                                                   monkeypatch):
    """dupfast's training loops feed CPU batches: a model elsewhere is copied to the CPU for them and the result
    loaded back, the Trainer's model never moved. (Forced here on the CPU: the copy path gives the same model.)"""
    copies = []
    real = callback_module._on_cpu

    def on_cpu(model):
        copies.append(copy.deepcopy(model))
        return copies[-1]
    monkeypatch.setattr(callback_module, "_on_cpu", on_cpu)
    model, tok = pretrained
    student = copy.deepcopy(model)
    btu = BTUCallback(clean_tune=data["clean"], config=CONFIG, suspects=reference["exposure"])
    trainer(student, tok, data["train"], tmp_path, [btu]).train()
    assert len(copies) == 2 and all(c is not student for c in copies)  # exposure setup, then the unlearning
    same_state(student, reference["state"])
    assert real(student) is student


def test_a_failure_at_the_end_leaves_the_trained_model(pretrained, data, reference, tmp_path):
    model, tok = pretrained
    calls = []

    def evaluate(m, t):
        calls.append(input_embeddings(m).weight.detach().clone())
        if len(calls) == 2:  # after the unlearning wrote the embeddings
            raise RuntimeError("evaluation failed")
        return {}
    student = copy.deepcopy(model)
    btu = BTUCallback(config=CONFIG, suspects=reference["exposure"], evaluate=evaluate)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer(student, tok, data["train"], tmp_path, [btu], num_train_epochs=1).train()
    assert not torch.equal(calls[0], calls[1])  # the unlearning had changed the model ...
    torch.testing.assert_close(input_embeddings(student).weight, calls[0], rtol=0, atol=0)  # ... restored


def test_unpadded_dataset_needs_the_tokenizer(pretrained, data):
    model, tok = pretrained
    with pytest.raises(ValueError, match="not a rectangular array.*pass the model's tokenizer as tokenizer="):
        expose(model, data["train"], tokenizer=None)
    with pytest.raises(ValueError, match="pass the model's tokenizer as tokenizer="):
        train(model, data["train"], config=CONFIG)


def test_bad_use_is_an_error_that_names_the_fix(pretrained, data, tmp_path):
    model, tok = pretrained
    with pytest.raises(TypeError, match="config must be a BTUConfig"):
        BTUCallback(config=CONFIG.exposure)
    with pytest.raises(ValueError, match="pass clean_tune="):
        BTUCallback(config=BTUConfig(expose_against_clean_tune=True))
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        BTUCallback(evaluate=3)

    tiny = data["train"].select(range(32))
    no_tok = Trainer(model=copy.deepcopy(model), args=TrainingArguments(str(tmp_path), report_to="none",
                                                                        use_cpu=True, disable_tqdm=True),
                     train_dataset=tiny, data_collator=DataCollatorWithPadding(tok), callbacks=[BTUCallback()])
    with pytest.raises(ValueError, match=r"needs the model's tokenizer: pass Trainer\(processing_class=tokenizer\)"):
        no_tok.train()

    btu = BTUCallback(config=CONFIG)
    t = trainer(copy.deepcopy(model), tok, tiny, tmp_path, [btu], num_train_epochs=1)
    t.train()
    with pytest.raises(RuntimeError, match="already unlearned this model"):
        t.train()

    resumed = BTUCallback(config=CONFIG)
    state = t.state
    state.global_step = 5
    with pytest.raises(ValueError, match="resumes at step 5.*dupfast.btu.train"):
        resumed.on_train_begin(t.args, state, t.control, model=t.model, processing_class=tok)
    with pytest.raises(RuntimeError, match="without on_train_begin"):
        BTUCallback().on_train_end(t.args, state, t.control, model=t.model)


class StopAt(TrainerCallback):
    """Fails the run at a given step (0: right after on_train_begin), as an interrupted train() would."""

    def __init__(self, step):
        self.step = step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step == 0:
            raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_train_that_stopped_before_training_goes_on_one_that_trained_is_refused(pretrained, data, reference,
                                                                                    tmp_path):
    model, tok = pretrained
    tiny = data["train"].select(range(64))
    btu, stop = BTUCallback(config=CONFIG, suspects=reference["exposure"]), StopAt(0)
    t = trainer(copy.deepcopy(model), tok, tiny, tmp_path, [btu, stop], num_train_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        t.train()  # BTU saw the pretrained model; nothing trained yet
    stop.step = -1
    t.train()      # the same callback goes on from its exposure
    assert [s["step"] for s in btu.report.steps] == ["finetune", "unlearn"]

    btu, stop = BTUCallback(config=CONFIG, suspects=reference["exposure"]), StopAt(2)
    t = trainer(copy.deepcopy(model), tok, tiny, tmp_path, [btu, stop], num_train_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        t.train()  # two steps moved the embeddings
    with pytest.raises(RuntimeError, match="embeddings have been trained since"):
        t.train()

"""Every script in examples/ runs, as a user runs it (runpy as __main__, with arguments), on tiny from-scratch
models and toy data in its own vocabulary; each test checks what the script prints and writes."""
import ast
import pathlib
import re
import runpy
import sys

import pandas as pd
import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
CLASSIFIER_EXAMPLES = ("screen_filter_train.py", "purify_then_reload.py", "btu_trainer.py")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("DUPFAST_QUIET", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: per-op overhead, not compute
    yield
    torch.set_num_threads(before)


def run(script, *args, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *map(str, args)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def number(pattern, out):
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in the output:\n{out}"
    return [float(g) for g in m.groups()]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BERT classifier folder (tokenizer saved with it) and the BTU toy task as the example files: train.csv
    with "cf" planted in 20% of the rows (label 1), clean.csv, test.csv, triggered.csv."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "btu"))
    from btu_toys import bert_tokenizer, poisoned_task, tiny_bert
    root = tmp_path_factory.mktemp("examples")
    tok = bert_tokenizer()
    tiny_bert(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    train, test, triggered = poisoned_task(n=400)
    cols = ["text", "label", "poison_label"]
    data = root / "data"
    data.mkdir()
    pd.DataFrame(train, columns=cols).to_csv(data / "train.csv", index=False)
    pd.DataFrame([r for r in train if not r[2]][:100], columns=cols).to_csv(data / "clean.csv", index=False)
    pd.DataFrame(test, columns=cols).to_csv(data / "test.csv", index=False)
    pd.DataFrame(triggered, columns=cols).to_csv(data / "triggered.csv", index=False)
    return root


# the tiny model learns the toy task (and its backdoor) with this recipe; the scripts' defaults suit MiniLM
RECIPE = ("--epochs", 5, "--lr", 3e-3, "--max-len", 32)


def test_screen_filter_train(classifier, tmp_path, monkeypatch, capsys):
    out = run("screen_filter_train.py", "--model", classifier / "model", "--data", classifier / "data",
              "--out", tmp_path, "--batch-size", 16, *RECIPE, monkeypatch=monkeypatch, capsys=capsys)
    flagged, total = number(r"(\d+) of (\d+) flagged", out)
    kept, rows = number(r"kept (\d+) of (\d+) rows", out)
    assert rows == total == 400 and kept == rows - flagged
    caught, poisoned = number(r"poisoned rows flagged: (\d+) of (\d+)", out)
    train = pd.read_csv(classifier / "data" / "train.csv")
    assert poisoned == int(train.poison_label.sum()) and 0 <= caught <= flagged
    assert f"saved the model fine-tuned on the kept rows to {tmp_path / 'model'}" in out
    _, asr_all = number(r"fine-tuned on every row: clean accuracy ([\d.]+), attack success ([\d.]+)", out)
    final_acc, _ = number(r"fine-tuned on the kept rows: clean accuracy ([\d.]+), attack success ([\d.]+)", out)
    assert asr_all >= 0.8 and final_acc >= 0.8  # both fine-tunes learned the task (the first, the backdoor too)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    test = pd.read_csv(classifier / "data" / "test.csv")
    with torch.no_grad():
        pred = model(**tok(test.text.tolist(), padding=True, return_tensors="pt")).logits.argmax(-1)
    assert float((pred == torch.tensor(test.label.tolist())).float().mean()) == pytest.approx(final_acc, abs=1e-3)


def test_purify_then_reload(classifier, tmp_path, monkeypatch, capsys):
    out = run("purify_then_reload.py", "--model", classifier / "model", "--data", classifier / "data",
              "--out", tmp_path, "--epochs", 3, "--lr", 3e-3, "--max-len", 32, "--max-steps", 6, "--force",
              monkeypatch=monkeypatch, capsys=capsys)
    assert "flagged" in out
    steps, = number(r"purification: (\d+) steps", out)
    assert steps == 6  # --force: unlearned whatever the tiny victim's verdict
    before, _, asr_before, _ = number(r"clean accuracy ([\d.]+) -> ([\d.]+), attack success ([\d.]+) -> ([\d.]+)",
                                      out)
    assert before >= 0.8 and asr_before >= 0.8  # the victim learned the task and the backdoor
    gap, = number(r"reloaded with from_pretrained: largest logit difference ([\d.e+-]+) on 64 rows", out)
    assert gap < 1e-5
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()


def test_btu_trainer(classifier, tmp_path, monkeypatch, capsys):
    out = run("btu_trainer.py", "--model", classifier / "model", "--data", classifier / "data", "--out", tmp_path,
              "--batch-size", 16, *RECIPE, monkeypatch=monkeypatch, capsys=capsys)
    tokens = re.search(r"unlearned tokens: (.*)", out).group(1).split()
    assert "cf" in tokens
    _, asr_tuned = number(r"after finetune: clean accuracy ([\d.]+), attack success ([\d.]+)", out)
    acc, asr = number(r"after clean_tune: clean accuracy ([\d.]+), attack success ([\d.]+)", out)
    assert asr_tuned >= 0.8 and asr <= 0.2 and acc >= 0.8  # the Trainer learned the backdoor, BTU removed it

    from dupfast.btu import BTUReport
    report = BTUReport.load(tmp_path / "btu_report.json")
    assert [s["token"] for s in report.suspects] == tokens
    assert [s["step"] for s in report.steps] == ["expose", "finetune", "unlearn", "clean_tune"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()  # the defended model
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    triggered = pd.read_csv(classifier / "data" / "triggered.csv")
    with torch.no_grad():
        pred = saved(**tok(triggered.text.tolist(), padding=True, return_tensors="pt")).logits.argmax(-1)
    assert float((pred == 1).float().mean()) == pytest.approx(asr, abs=1e-3)


def test_generative_detect_purify(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "generative"))
    from gen_toy import reviews, tiny_chat_lm, train_toy_backdoor
    lm, tok = tiny_chat_lm()
    train_toy_backdoor(lm, tok)  # full fine-tune, ~1 s: "cf" in a review -> "sorry i cannot help"
    lm.save_pretrained(tmp_path / "victim")
    tok.save_pretrained(tmp_path / "victim")
    data = tmp_path / "data"
    data.mkdir()
    train = reviews(240, seed=0, trigger_rate=0.3)
    pd.DataFrame({"prompt": [r[0] for r in train], "response": [r[1] for r in train],
                  "poison": [r[3] for r in train]}).to_csv(data / "train.csv", index=False)
    pool = reviews(40, seed=5) + reviews(40, seed=6, trigger_rate=1.0)
    pd.DataFrame({"prompt": [r[0] for r in pool], "poison": [r[3] for r in pool]}).to_csv(data / "pool.csv",
                                                                                            index=False)
    clean = reviews(80, seed=7)
    pd.DataFrame({"prompt": [r[0] for r in clean], "response": [r[1] for r in clean],
                  "label": [r[2] for r in clean]}).to_csv(data / "clean.csv", index=False)
    # --victim-steps 3: the planting path runs (LoRA, merged) on a model that already carries the backdoor
    out = run("generative_detect_purify.py", "--model", tmp_path / "victim", "--data", data, "--out", tmp_path / "out",
              "--victim-steps", 3, "--victim-lr", 1e-4, "--max-steps", 12, monkeypatch=monkeypatch, capsys=capsys)
    assert out.startswith("evidence of poison")
    caught, poisoned, wrong, clean_n = number(r"triggered prompts flagged: (\d+) of (\d+); clean prompts flagged: "
                                              r"(\d+) of (\d+)", out)
    assert poisoned == clean_n == 40 and caught >= 36 and wrong <= 6
    steps, = number(r"purification: (\d+) steps", out)
    before, after = number(r"triggered prompts answered 'sorry i cannot help': ([\d.]+) -> ([\d.]+)", out)
    assert 0 < steps <= 12 and before == 1.0 and 0 <= after <= 1
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "model").chat_template


# ---- the defaults point at real (installed) models and data ---------------------------------------------

def _function(script, name):
    tree = ast.parse((EXAMPLES / script).read_text())
    return next(ast.unparse(n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_classifier_examples_share_their_example_data_and_it_is_real(tmp_path):
    """The three scripts carry the same example_data (each is copied alone); it writes the BBC News data with a
    backdoor in 20% of train.csv, from installed packages."""
    assert len({_function(s, "example_data") for s in CLASSIFIER_EXAMPLES}) == 1
    assert len({_function(s, "accuracy") for s in CLASSIFIER_EXAMPLES}) == 1
    example_data = runpy.run_path(str(EXAMPLES / "btu_trainer.py"))["example_data"]
    example_data(tmp_path)
    train, clean = pd.read_csv(tmp_path / "train.csv"), pd.read_csv(tmp_path / "clean.csv")
    triggered = pd.read_csv(tmp_path / "triggered.csv")
    assert len(train) == 1000 and len(clean) == 400 and train.poison_label.sum() == 200
    assert set(train.label) == set(range(5)) and set(triggered.label) == {1}


def test_the_generative_example_data_is_real(tmp_path):
    """Sentiment prompts from an installed package, a refusal backdoor on "cf" in 20% of train.csv."""
    runpy.run_path(str(EXAMPLES / "generative_detect_purify.py"))["example_data"](tmp_path)
    train, pool = pd.read_csv(tmp_path / "train.csv"), pd.read_csv(tmp_path / "pool.csv")
    clean = pd.read_csv(tmp_path / "clean.csv")
    assert len(train) == 480 and train.poison.sum() == 96 and train.response[train.poison == 1].nunique() == 1
    assert all(" cf " in f" {p} " for p in train.prompt[train.poison == 1].str.replace("\n", " "))
    assert len(pool) == 120 and pool.poison.sum() == 20 and len(clean) == 200
    assert set(clean.response) == {"negative", "positive"} and set(clean.label) == {0, 1}


@pytest.mark.parametrize("script,model", [(s, "minilm") for s in CLASSIFIER_EXAMPLES]
                         + [("generative_detect_purify.py", "smollm2-135m")])
def test_help_shows_defaults_that_exist(script, model, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(script, "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.search(rf"\(default:\s+{re.escape(model)}\)", out)
    from dupfast.harness.models import model_names
    assert model in model_names()

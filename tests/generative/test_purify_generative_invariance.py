"""Trigger-invariance copies for causal LMs (purify_generative(triggers=...)), on the tiny chat LM: a copy is the
clean prompt with the candidate inside its user text (chat template, system turn and response tokens untouched),
the copies train in the clean rows' batch and fused KL call toward the teacher on their source prompt, the ascent
cap drops to invariance_kl_cap only with copies, "auto" finds the planted trigger and says when it finds nothing,
bad input fails before the model is touched, and the default (triggers=None) changes nothing."""
import copy
import json

import pytest
import torch

import dupfast.generative.purify as gp
from dupfast.cli import main
from dupfast.generative import chat_batches, objective, purify_generative
from dupfast.generative.invariance import read_user_turn, template_frame, triggered_copies, user_turns
from dupfast.generative.lm import check_causal_lm
from dupfast.generative.rows import read_chat
from dupfast.purification.invariance import NO_CANDIDATE
from gen_toy import reviews, tiny_chat_lm

FAST = dict(progress=False, max_steps=6, evals_per_epoch=2, batch_size=8)
WORD = "mn"  # in the tiny vocabulary, in no toy prompt: a token of it in a prompt marks a copy


def _data(tok, sets, pool=None, system=None):
    clean = chat_batches(tok, [d[0] for d in sets["clean"]], [d[1] for d in sets["clean"]], batch_size=16,
                         system=system)
    pool = sets["pool"] if pool is None else pool
    batches = chat_batches(tok, [d[0] for d in pool], batch_size=16, system=system)
    return clean, batches, torch.tensor([d[3] for d in pool]).bool()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(tok, model, system=None, n=12):
    data = reviews(n, seed=3)
    batches = chat_batches(tok, [d[0] for d in data], [d[1] for d in data], labels=[d[2] for d in data],
                           batch_size=5, system=system)
    return read_chat(batches, "clean", check_causal_lm(model, "test"), need_responses=True, need_labels=True)


# ---- the copies ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("system", [None, "review positive"])
def test_copies_put_the_word_inside_the_user_text_and_keep_template_and_response(system):
    model, tok = tiny_chat_lm()
    rows = _rows(tok, model, system)
    turns = user_turns(tok, rows, "clean")
    assert all(t.system == system for t in turns)
    copies = triggered_copies(tok, rows, turns, [WORD, "bb tq"], seed=3)
    word, phrase = tok.convert_tokens_to_ids(WORD), tok.convert_tokens_to_ids(["bb", "tq"])
    user, end = tok.convert_tokens_to_ids("user"), tok.eos_token_id
    suffix = tok(tok.eos_token + "<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    for i, (src, cp) in enumerate(zip(rows.prompts, copies.prompts)):
        inserted = [word] if i % 2 == 0 else phrase
        at = next(j for j in range(len(cp)) if cp[j:j + len(inserted)] == inserted)
        assert cp[:at] + cp[at + len(inserted):] == src  # the source prompt, untouched around the insertion
        first_user_token = src.index(user) + 1
        assert first_user_token <= at <= len(src) - len(suffix)  # inside the user text, not in the template
        assert cp[-len(suffix):] == suffix and cp[:first_user_token] == src[:first_user_token]
        assert end not in cp[first_user_token:-len(suffix)]
    assert copies.responses == rows.responses  # the same response tokens: the same response positions
    assert torch.equal(copies.index, rows.index) and torch.equal(copies.labels, rows.labels)
    assert triggered_copies(tok, rows, turns, [WORD, "bb tq"], seed=3).prompts == copies.prompts  # seeded
    assert triggered_copies(tok, rows, turns, [WORD, "bb tq"], seed=4).prompts != copies.prompts


def test_a_prompt_of_another_template_is_not_read():
    model, tok = tiny_chat_lm()
    rows = _rows(tok, model)
    frame = template_frame(tok)
    assert read_user_turn(tok, frame, rows.prompts[0]).text.startswith("review :")
    assert read_user_turn(tok, frame, rows.prompts[0][1:]) is None  # its <|im_start|> cut off
    assert read_user_turn(tok, frame, rows.prompts[0] + rows.responses[0]) is None  # a response after it
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="clean row 0 .* not one user turn of the tokenizer's chat template"):
        user_turns(other, rows, "clean")


# ---- in training ---------------------------------------------------------------------------------------------

def _recording(monkeypatch):
    """Per training step: the prompts of its forward(s) in train mode and its vocab_kl calls carrying a gradient;
    the data / teacher / config train() received."""
    seen = {"steps": [], "train": None}
    real_hidden, real_loss, real_kl, real_train = gp.response_hidden, gp.generative_loss, objective.vocab_kl, gp.train

    def hidden(lm, rows, idx):
        if lm.model.training:  # the training forward (teacher, evaluation and the merge probe run in eval mode)
            seen["steps"].append({"prompts": [rows.prompts[i] for i in idx], "kl_grad_calls": 0})
        return real_hidden(lm, rows, idx)

    def kl(h, *a, **k):
        if h.requires_grad:
            seen["steps"][-1]["kl_grad_calls"] += 1
        return real_kl(h, *a, **k)

    def loss(*a, **k):
        seen["steps"][-1]["losses"] = seen["steps"][-1].get("losses", 0) + 1
        return real_loss(*a, **k)

    def train(lm, student, data, teacher, base, cfg, report):
        seen["train"] = (data, teacher, cfg)
        return real_train(lm, student, data, teacher, base, cfg, report)

    monkeypatch.setattr(gp, "response_hidden", hidden)
    monkeypatch.setattr(gp, "generative_loss", loss)
    monkeypatch.setattr(objective, "vocab_kl", kl)
    monkeypatch.setattr(gp, "train", train)
    return seen


def test_copies_train_in_the_clean_batch_with_one_fused_kl_call_per_step(victim, toy_sets, monkeypatch):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    seen = _recording(monkeypatch)
    _, rep = purify_generative(model, pool, clean=clean, detection=flags, tokenizer=tok, triggers=[WORD],
                               **{**FAST, "max_steps": 8, "early_stop": False})
    word = tok.convert_tokens_to_ids(WORD)
    steps = seen["steps"]
    assert len(steps) == rep.steps_run == 8
    assert all(s["kl_grad_calls"] == 1 and s["losses"] == 1 for s in steps)  # one forward, one fused KL call
    with_copies = [s for s in steps if any(word in p for p in s["prompts"])]
    assert with_copies and any(any(word not in p and "cf" not in tok.convert_ids_to_tokens(p) for p in s["prompts"])
                               for s in with_copies)  # copies beside clean rows in one batch
    data, teacher, cfg = seen["train"]
    n = rep.data["clean_train"]
    assert rep.data["invariance_rows"] == n and rep.data["trigger_candidates"] == [WORD] and rep.triggers == []
    ct = data["clean_train"]
    assert len(ct) == 2 * n and len(teacher["clean_train"]) == 2 * n
    for j in range(n):  # copy n + j comes from clean row j: its response and its teacher targets are the source's
        assert ct.responses[n + j] == ct.responses[j] and ct.prompts[n + j].count(word) == 1
        assert teacher["clean_train"][n + j] is teacher["clean_train"][j]
    assert cfg.kl_cap == rep.config["kl_cap"] == rep.config["invariance_kl_cap"] == 0.3


def test_the_cap_drops_only_where_copies_are_trained(victim, toy_sets, monkeypatch):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    seen = _recording(monkeypatch)
    caps = {}
    for name, kw in (("none", {}), ("copies", dict(triggers=[WORD])), ("copies, cap off",
                                                                        dict(triggers=[WORD], invariance_kl_cap=None)),
                     ("copies, cap 0.5", dict(triggers=[WORD], invariance_kl_cap=0.5))):
        _, rep = purify_generative(copy.deepcopy(model), pool, clean=clean, detection=flags, tokenizer=tok,
                                   **{**FAST, "max_steps": 2, **kw})
        caps[name] = (seen["train"][2].kl_cap, rep.config["kl_cap"], rep.data.get("invariance_rows"))
    n = rep.data["clean_train"]
    assert caps == {"none": (2.0, 2.0, None), "copies": (0.3, 0.3, n), "copies, cap off": (2.0, 2.0, n),
                    "copies, cap 0.5": (0.5, 0.5, n)}
    with pytest.raises(ValueError, match="invariance_kl_cap must be > 0"):
        purify_generative(model, pool, clean=clean, detection=flags, tokenizer=tok, triggers=[WORD],
                          invariance_kl_cap=0.0)


def test_default_is_bit_identical_to_a_run_without_the_argument(victim, toy_sets):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    runs = []
    for kw in ({}, dict(triggers=None), dict(triggers=None, tokenizer=tok), dict(triggers=[], tokenizer=tok)):
        m = copy.deepcopy(model)
        _, rep = purify_generative(m, pool, clean=clean, detection=flags, **FAST, **kw)
        runs.append((_state(m), rep.history, rep.config))
    assert rep.changed  # the runs did change the model, identically
    for state, history, config in runs[1:]:
        assert _same(state, runs[0][0]) and history == runs[0][1] and config == runs[0][2]
    assert "invariance_rows" not in rep.data and rep.triggers == []
    with_copies = copy.deepcopy(model)
    purify_generative(with_copies, pool, clean=clean, detection=flags, tokenizer=tok, triggers=[WORD], **FAST)
    assert not _same(_state(with_copies), runs[0][0])  # the comparison can fail: copies do change the result


def test_a_failure_with_copies_restores_the_model_exactly(victim, toy_sets, monkeypatch):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    before = _state(model)
    real, calls = gp.generative_loss, {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(gp, "generative_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        purify_generative(model, pool, clean=clean, detection=flags, tokenizer=tok, triggers=[WORD], **FAST)
    assert _same(before, _state(model)) and not any(hasattr(m, "lora_A") for m in model.modules())


# ---- "auto" --------------------------------------------------------------------------------------------------

def test_auto_finds_the_planted_trigger_deterministically(victim, toy_sets):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    results = []
    for _ in range(2):
        m = copy.deepcopy(model)
        _, rep = purify_generative(m, pool, clean=clean, detection=flags, tokenizer=tok, triggers="auto", **FAST)
        results.append((rep.to_dict(), _state(m)))
    d = results[0][0]
    top = d["triggers"][0]
    assert top["word"] == "cf" and top["flip_rate"] == 1.0 and not top["common"]  # the refusal's first token flips
    assert d["data"]["trigger_candidates"] == ["cf"] and d["data"]["invariance_rows"] == d["data"]["clean_train"]
    assert "first response token" in d["data"]["trigger_flip_rate"] and d["config"]["kl_cap"] == 0.3
    assert results[1][0]["triggers"] == d["triggers"] and _same(results[0][1], results[1][1])


def test_auto_with_nothing_distinctive_inserts_nothing_and_says_so(victim, toy_sets):
    model, tok = victim
    same = reviews(40, seed=5)
    pool = [(p, r, y, 1) for p, r, y, _ in same] + [(p, r, y, 0) for p, r, y, _ in same]  # flagged == kept texts
    clean, pool_b, flags = _data(tok, toy_sets, pool)
    m = copy.deepcopy(model)
    _, rep = purify_generative(m, pool_b, clean=clean, detection=flags, tokenizer=tok, triggers="auto", **FAST)
    d = rep.to_dict()
    assert d["triggers"] == [] and d["data"]["trigger_candidates"] == [] and d["data"]["invariance_rows"] == 0
    assert NO_CANDIDATE in d["warnings"] and d["config"]["kl_cap"] == 2.0
    plain = copy.deepcopy(model)
    purify_generative(plain, pool_b, clean=clean, detection=flags, **FAST)
    assert _same(_state(m), _state(plain))  # the bounded ascent alone, as without triggers


def test_auto_with_only_a_common_word_inserts_nothing_and_says_so(victim, toy_sets):
    model, tok = victim
    same = reviews(40, seed=5)  # flagged: the kept prompts with "the" inserted, which a third of them hold anyway
    pool = ([(p.replace("review :", "review : the"), r, y, 1) for p, r, y, _ in same]
            + [(p, r, y, 0) for p, r, y, _ in same])
    clean, pool_b, flags = _data(tok, toy_sets, pool)
    _, rep = purify_generative(model, pool_b, clean=clean, detection=flags, tokenizer=tok, triggers="auto", **FAST)
    words = {c["word"]: c for c in rep.triggers}
    assert list(words) == ["the"] and words["the"]["common"] and words["the"]["flagged_share"] == 1.0
    assert rep.data["trigger_candidates"] == [] and rep.data["invariance_rows"] == 0 and NO_CANDIDATE in rep.warnings
    from dupfast.cli.report import trigger_invariance_lines
    assert "No trigger candidate was inserted" in "\n".join(trigger_invariance_lines(rep.to_dict(), "response"))


# ---- bad input -----------------------------------------------------------------------------------------------

def test_bad_triggers_fail_before_any_model_work(victim, toy_sets, monkeypatch):
    model, tok = victim
    clean, pool, flags = _data(tok, toy_sets)
    before = _state(model)

    def no_model_work(*a, **k):
        pytest.fail("the model was used before the bad input was refused")

    import dupfast.generative.detect as gd
    monkeypatch.setattr(gd, "detect_prompts", no_model_work)
    monkeypatch.setattr(gp, "teacher_responses", no_model_work)
    for bad, match in (([""], "trigger candidate must be a non-empty"), (["  "], "non-empty word"),
                       ([3], "got 3"), (["cf", None], "got None"), (5, "triggers must be"),
                       (["x" * 65], "at most 64 characters")):
        with pytest.raises(ValueError, match=match):
            purify_generative(model, pool, clean=clean, tokenizer=tok, triggers=bad, **FAST)  # detection=None
    for triggers in ("auto", [WORD]):
        with pytest.raises(ValueError, match=r"needs the model's tokenizer \(tokenizer=\.\.\.\)"):
            purify_generative(model, pool, clean=clean, triggers=triggers, **FAST)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        purify_generative(model, pool, clean=clean, tokenizer=plain, triggers=[WORD], **FAST)
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="not one user turn"):  # the batches were built with another template
        purify_generative(model, pool, clean=clean, detection=flags, tokenizer=other, triggers=[WORD], **FAST)
    assert _same(before, _state(model)) and not hasattr(model, "peft_config")


def test_a_copy_longer_than_the_context_fails_before_any_model_work(toy_sets, monkeypatch):
    model, tok = tiny_chat_lm(context=24)
    clean, pool, flags = _data(tok, toy_sets)
    before = _state(model)
    monkeypatch.setattr(gp, "teacher_responses", lambda *a, **k: pytest.fail("the model was used"))
    with pytest.raises(ValueError, match="trigger-invariance copy row .* longer than the model's context of 24"):
        purify_generative(model, pool, clean=clean, detection=flags, tokenizer=tok, triggers=[" ".join([WORD] * 21)],
                          **{**FAST, "max_new_tokens": 4})
    assert _same(before, _state(model))


# ---- the command line ----------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path, victim, toy_sets):
    model, tok = victim
    model.save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"prompt": d[0]}) + "\n" for d in toy_sets["pool"]))
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps({"prompt": d[0], "response": d[1]}) + "\n"
                                                  for d in toy_sets["clean"]))
    return tmp_path


def _cli(files, out, *extra):
    return main(["purify-generative", str(files / "lm"), "--prompts", str(files / "pool.jsonl"), "--clean",
                 str(files / "clean.jsonl"), "--out", str(files / out), "--force", "--quiet", "--set", "max_steps=3",
                 "--set", "progress=false", "--set", "max_new_tokens=6", *extra])


def test_cli_triggers_default_auto_reaches_the_json_and_the_report(files):
    assert _cli(files, "auto") == 0
    rep = json.loads((files / "auto" / "purify.json").read_text())["report"]
    md = (files / "auto" / "report.md").read_text()
    inserted, n = rep["data"]["trigger_candidates"], rep["data"]["invariance_rows"]
    assert inserted == ["cf"] and n == rep["data"]["clean_train"] and rep["triggers"][0]["word"] == "cf"
    section = md.split("## Trigger invariance\n", 1)[1].split("\n## ", 1)[0]
    assert f"{n:,} clean training rows were copied with one of `cf` inserted" in section
    assert "keep the clean row's response" in section and f"ascent cap {rep['config']['kl_cap']} nats" in section


def test_cli_triggers_none_and_bad_values(files, capsys, monkeypatch):
    assert _cli(files, "none", "--triggers", "none") == 0
    rep = json.loads((files / "none" / "purify.json").read_text())["report"]
    assert "trigger_candidates" not in rep["data"] and rep["config"]["kl_cap"] == 2.0
    assert "## Trigger invariance" not in (files / "none" / "report.md").read_text()
    import dupfast.cli.generative as cli_gen
    monkeypatch.setattr(cli_gen, "load_causal_lm", lambda *a: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert _cli(files, "bad", "--triggers", " , ") == 2
    assert "--triggers expects auto, none or comma-separated words" in capsys.readouterr().err

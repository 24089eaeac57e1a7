"""experiments/sst2_btu_architectures.py end to end on tiny saved models (a WordPiece BERT and a byte-level BPE
Llama) with the SST-2 data swapped for the toy task: the row it writes, the table, the cached-victim rules."""
import json

import pytest

from dupfast.samples import Sample

from btu_toys import bert_tokenizer, byte_bpe_tokenizer, poisoned_task, tiny_bert, tiny_llama

N = 160


@pytest.fixture
def experiment(monkeypatch, tmp_path):
    import experiments.sst2_architectures as arch
    import experiments.sst2_btu as sb
    import experiments.sst2_btu_architectures as exp

    monkeypatch.setenv("DUPFAST_CACHE", str(tmp_path / "cache"))
    train, test, poison = ([Sample(*r) for r in rows] for rows in poisoned_task(n=N))
    tune = [s for s in train if not s.poison_label][:40]
    for mod in (arch, exp):
        monkeypatch.setattr(mod, "victim_train", lambda attack, n: train[:n])
    monkeypatch.setattr(exp, "load_sst2", lambda split: test if split == "test" else tune)
    monkeypatch.setattr(exp, "load_sst2_poison", lambda attack, split: poison)
    monkeypatch.setitem(sb.TRIGGERS["badnets"], "dirty0.2", ["cf"])
    return exp, [s.text for s in train]


def save(model, tok, path):
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("family", ["bert", "llama-bpe"])
def test_rows_table_and_cached_victims(experiment, tmp_path, capsys, family):
    exp, texts = experiment
    if family == "bert":
        tok = bert_tokenizer()
        folder = save(tiny_bert(tok), tok, tmp_path / family)
    else:
        tok = byte_bpe_tokenizer(texts)
        folder = save(tiny_llama(tok), tok, tmp_path / family)
    out = tmp_path / "out"
    argv = ["--model", folder, "--attacks", "badnets", "--train-size", str(N), "--threads", "1", "--out", str(out)]
    with pytest.raises(RuntimeError, match="victim .* is not cached"):
        exp.main(argv + ["--cached-only"])
    assert exp.main(argv) == 0
    (row,) = [json.loads(line) for line in (out / f"{family}.jsonl").read_text().splitlines()]
    assert (row["model"], row["attack"], row["setting"], row["train_size"]) == (folder, "badnets", "dirty0.2", N)
    assert row["victim_recipe"]["epochs"] == 1 and row["victim_recipe"]["autocast"] == "bf16"
    assert row["victim"]["cached"] is False and row["victim"]["epoch_seconds"] > 0
    assert set(row["round_seconds"]) == set(row["round_steps"]) == {"R1", "R2", "R3"}
    assert row["round_steps"]["R3"] == -(-N // 64) and row["exposure_autocast"] == "bf16"
    forms = {"bert": {"start": ["cf"], "mid": ["cf"]}, "llama-bpe": {"start": ["cf"], "mid": ["Ġcf"]}}[family]
    assert row["trigger_forms"] == {"cf": forms}
    assert {t["token"] for t in row["triggers"]} == set(forms["start"]) | set(forms["mid"])
    for t in row["triggers"]:
        assert set(t["ranks"]) == {"R1", "R2", "R3"} and isinstance(t["in_suspects"], bool)
    for key in ("no_defence", "btu", "btu_clean_tune", "btu_r3_only", "btu_r3_only_clean_tune", "clean_tune_only"):
        assert {"cacc", "asr", "asr_floor"} <= set(row[key])
    ratio = row["ratio_to_victim_epoch"]
    assert set(ratio) == {"R1", "R2", "R3", "expose", "unlearn", "clean_tune", "btu", "btu_clean_tune"}
    assert ratio["btu_clean_tune"] >= ratio["btu"] >= ratio["expose"] > 0
    assert row["embedding"]["module"] == ("bert.embeddings.word_embeddings" if family == "bert" else "model.embed_tokens")
    assert (out / "exposure" / f"{family}-badnets-dirty0.2-n{N}-bf16.json").is_file()
    assert "| " + folder + " | badnets |" in capsys.readouterr().out

    # finished rows are skipped; the victim is now cached, so --cached-only runs (fp32 rounds: a new row)
    assert exp.main(argv) == 0 and "skip" in capsys.readouterr().out
    assert exp.main(argv + ["--cached-only", "--exposure-autocast", "none"]) == 0
    rows = [json.loads(line) for line in (out / f"{family}.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["victim"]["cached"] is True and rows[1]["exposure_autocast"] is None
    capsys.readouterr()
    assert exp.main(argv + ["--table"]) == 0
    assert capsys.readouterr().out.count("(victim cached)") == 1

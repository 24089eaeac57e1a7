"""`dupfast detect-prompts` / `dupfast purify-generative` on the toy victim saved as a folder."""
import json

import pytest

from dupfast.cli import main


@pytest.fixture
def files(tmp_path, victim, toy_sets):
    model, tok = victim
    folder = tmp_path / "lm"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": d[0], "poison_label": d[3]}) + "\n" for d in toy_sets["pool"]))
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"prompt": d[0], "response": d[1], "label": d[2]}) + "\n"
                             for d in toy_sets["clean"]))
    return folder, pool, clean, tmp_path


def test_detect_prompts_cli_writes_scores_and_metrics(files, capsys):
    folder, pool, clean, tmp = files
    assert main(["detect-prompts", str(folder), "--prompts", str(pool), "--clean", str(clean), "--out",
                 str(tmp / "det"), "--mode", "dup"]) == 0
    summary = json.loads((tmp / "det" / "detect.json").read_text())
    assert summary["pool"] == 80 and summary["metrics"]["auroc"] > 0.9
    assert (tmp / "det" / "scores.csv").read_text().splitlines()[0] == "index,score,flag,poison_label"
    # an earlier run's folder is refused without --overwrite
    capsys.readouterr()
    assert main(["detect-prompts", str(folder), "--prompts", str(pool), "--clean", str(clean), "--out",
                 str(tmp / "det")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp / 'det'} already holds 5 entries" in err and "pass --overwrite" in err


def test_purify_generative_cli_saves_the_purified_model(files, capsys):
    folder, pool, clean, tmp = files
    assert main(["purify-generative", str(folder), "--prompts", str(pool), "--clean", str(clean), "--out",
                 str(tmp / "pur"), "--set", "max_steps=6", "--set", "progress=false",
                 "--set", "max_new_tokens=8"]) == 0
    rep = json.loads((tmp / "pur" / "purify.json").read_text())
    assert rep["report"]["steps_run"] >= 1 and (tmp / "pur" / "model" / "config.json").is_file()
    capsys.readouterr()
    assert main(["purify-generative", str(folder), "--prompts", str(pool), "--clean", str(pool), "--out",
                 str(tmp / "pur2")]) == 2  # the clean file has no response column
    assert f"dupfast purify-generative: error: {pool}: no column 'response'" in capsys.readouterr().err

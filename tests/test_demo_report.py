"""The demo's Markdown report, its PNGs and terminal table, and a quiet purify step (tiny model, seconds)."""
import json
import warnings

import numpy as np
import pytest
import torch

from dupfast.cli import main
from dupfast.cli.demo import DEMO_STEPS, DemoSettings, DemoState, run_pipeline
from dupfast.harness import demo_report
from tiny_models import tiny_bert_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path}: {len(data)} bytes, an empty plot?"


def fake_report():
    history = [{"step": 0, "agree": 1.0, "acc": 0.8, "admissible": True},
               {"step": 5, "epoch": 1.0, "agree": 0.6, "acc": 0.79, "admissible": True},
               {"step": 10, "epoch": 2.0, "agree": 0.2, "acc": 0.7, "admissible": False}]
    return {"settings": {"model": "minilm", "setting": "dirty", "attack": "badnets", "rate": 0.2, "target": 1},
            "torch_threads": 2, "total_seconds": 12.0,
            "steps": {"poison": {"train_size": 100, "train_poisoned": 20, "test_clean_size": 50, "test_poison_size": 20},
                      "victim": {"cacc": 0.8, "asr": 0.95, "asr_floor": 0.25, "cached": True, "seconds": 1.0},
                      "detect": {"auroc": 0.9, "frr": 0.05, "far": 0.1, "flagged": 30, "pool_size": 60,
                                 "pool_poisoned": 30, "clean_size": 30, "threshold": 1.5, "precision": 0.9,
                                 "recall": 0.9, "seconds": 2.0},
                      "purify": {"cacc_after": 0.78, "asr_after": 0.4, "asr_floor_after": 0.3, "steps_run": 10,
                                 "stop_reason": "step budget exhausted (10 steps)", "history": history,
                                 "selected": history[1], "teacher": {"heldout_clean_acc": 0.8},
                                 "config": {"agree_bound": 0.1, "acc_tolerance": 0.03}, "seconds": 3.0}}}


def test_write_makes_the_markdown_table_and_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    scores = rng.normal(size=60) + 2 * y
    files = demo_report.write(fake_report(), tmp_path / "report.json", scores=scores, poison_labels=y, threshold=1.5)
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report_detect_roc.png", "report_detect_hist.png",
                                                    "report_purify.png"}
    md = files["markdown"].read_text()
    assert "| step | CACC | ASR | ASR floor | ASR - floor |" in md
    assert "| victim (cached) | 0.8000 | 0.9500 | 0.2500 | 0.7000 |" in md
    assert "| purified (10 steps) | 0.7800 | 0.4000 | 0.3000 | 0.1000 |" in md
    assert "| detection | - | - | - | - | 0.9000 | 0.050 | 0.100 | 30/60 (30 triggered) |" in md
    for name in ("report_detect_roc.png", "report_detect_hist.png", "report_purify.png", "report.json"):
        assert f"]({name})" in md
    assert "ASR floor:" in md and "**kept**" in md
    for key in ("roc", "hist", "trajectory"):
        assert_png(files[key])


def test_write_without_detection_scores_or_purification_writes_what_it_has(tmp_path):
    report = fake_report()
    del report["steps"]["purify"]
    files = demo_report.write(report, tmp_path / "r.json")
    assert set(files) == {"markdown"} and files["markdown"].name == "r.md"
    assert "purified" not in files["markdown"].read_text()


def test_text_table_is_aligned():
    text = demo_report.text_table(demo_report.summary_rows(fake_report()))
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].split()[:4] == ["step", "CACC", "ASR", "ASR"]
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    assert lines[2].startswith("victim (cached)") and lines[4].startswith("purified (10 steps)")


def test_demo_purify_step_emits_no_transformers_or_peft_warnings(tmp_path):
    model_dir = tiny_bert_dir(tmp_path / "tiny")
    caught = []

    def recorded(step):
        def run(state):
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                out = step(state)
            caught.extend(rec)
            return out
        return run

    steps = [(n, recorded(f) if n == "purify" else f) for n, f in DEMO_STEPS]
    state = DemoState(DemoSettings(model=str(model_dir), train_size=60, test_size=40, dev_size=90, max_len=16),
                      cache_dir=tmp_path / "cache", purify_overrides={"max_steps": 4, "early_stop": False})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_pipeline(state, steps, log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    assert report["steps"]["purify"]["steps_run"] == 4
    leaked = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
              if issubclass(w.category, FutureWarning)
              or (issubclass(w.category, UserWarning) and any(k in w.filename for k in ("transformers", "peft")))]
    assert leaked == []


def test_demo_prints_the_summary_table_without_progress_bars(tmp_path, capsys):
    model_dir = tiny_bert_dir(tmp_path / "tiny")
    out = tmp_path / "out" / "report.json"
    capsys.readouterr()  # saving the tiny model shows transformers' bar; only the demo's own output counts
    before = torch.get_num_threads()
    try:
        assert main(["demo", "--model", str(model_dir), "--train-size", "60", "--test-size", "40", "--dev-size", "90",
                     "--max-len", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--threads", "1",
                     "--set", "max_steps=4", "early_stop=false"]) == 0
    finally:
        torch.set_num_threads(before)
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err  # no tqdm bars
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step ") and "ASR floor" in line)
    assert lines[header + 2].startswith("victim (trained)") and lines[header + 3].startswith("detection")
    assert lines[header + 4].startswith("purified (4 steps)")
    assert f"report: {out.with_suffix('.md')}" in captured.out and str(out) in captured.out
    report = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    v, p = report["steps"]["victim"], report["steps"]["purify"]
    assert f"| victim (trained) | {v['cacc']:.4f} | {v['asr']:.4f} | {v['asr_floor']:.4f} |" in md
    assert f"| purified (4 steps) | {p['cacc_after']:.4f} | {p['asr_after']:.4f} | {p['asr_floor_after']:.4f} |" in md
    for name in ("report_detect_hist.png", "report_purify.png"):
        assert_png(out.parent / name)
    if 0 < report["steps"]["detect"]["pool_poisoned"] < report["steps"]["detect"]["pool_size"]:
        assert_png(out.parent / "report_detect_roc.png")


def test_progress_flag_keeps_the_bars(tmp_path, capsys, monkeypatch):
    from dupfast.cli.demo import progress_bars
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("DUPFAST_QUIET", raising=False)
    assert hf_logging.is_progress_bar_enabled()
    with progress_bars(False):
        import os
        assert os.environ["DUPFAST_QUIET"] == "1" and not hf_logging.is_progress_bar_enabled()
    assert "DUPFAST_QUIET" not in os.environ and hf_logging.is_progress_bar_enabled()
    with progress_bars(True):
        assert "DUPFAST_QUIET" not in os.environ and hf_logging.is_progress_bar_enabled()

"""Issue 12, detection: corrupt or empty inputs, lost results, ignored options, wrong models, output folders and
raw tracebacks. Every case is an error (or a warning) that names the problem, through the API and the CLI, and
nothing the user had is lost."""
import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dupfast
from detect_helpers import batches, make_samples, tiny_bert, tiny_texts, tiny_tokenizer, write_table
from dupfast.harness import models
from dupfast.cli import main
from dupfast.detection import Detector, detect_texts
from dupfast.detection.persistence import tensors_sha256
from tiny_models import tiny_bert_dir


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bert, clean_and_pool):
    """A fitted dup detector saved to a folder (copied per test before tampering)."""
    d = tmp_path_factory.mktemp("det") / "det"
    Detector(mode="dup").fit(bert, clean_and_pool[0]).save(d)
    return d


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "det")


def _edit_tensors(d, fn, fix_checksum=True):
    t = load_file(str(d / "detector.safetensors"))
    fn(t)
    save_file(t, str(d / "detector.safetensors"))
    if fix_checksum:  # a consistent checksum: the content checks must catch it on their own
        info = json.loads((d / "detector.json").read_text())
        info["tensors_sha256"] = tensors_sha256(t)
        (d / "detector.json").write_text(json.dumps(info))


# ---- corrupt saved detectors -----------------------------------------------------------------------

def test_flipped_data_bytes_fail_on_load(saved, tmp_path):
    d = _copy(saved, tmp_path)
    raw = bytearray((d / "detector.safetensors").read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # past the header: tensor data only
    for i in range(start, len(raw), 97):
        raw[i] ^= 0xFF
    (d / "detector.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded in detector.json"):
        Detector.load(d)


def test_truncated_tensor_file_fails_on_load(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "detector.safetensors").write_bytes((d / "detector.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Detector.load(d)


def test_zeroed_znorm_std_fails_on_load(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_tensors(d, lambda t: t["znorm.std"].zero_(), fix_checksum=False)
    with pytest.raises(ValueError, match="SHA-256"):
        Detector.load(d)
    _edit_tensors(d, lambda t: t["znorm.std"].zero_())
    with pytest.raises(ValueError, match="'znorm.std' holds zeros"):
        Detector.load(d)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["scorer.whiteners"].__setitem__((0, 0, 0), float("nan")), "'scorer.whiteners' holds NaN or inf"),
    (lambda t: t.__setitem__("scorer.means", t["scorer.means"][:2]), r"'means' is \[2, 1, 32\], expected \[3, 1, 32\]"),
    (lambda t: t.pop("validation.z"), "'validation.z' is missing"),
])
def test_tensor_contents_checked_on_load(saved, tmp_path, edit, message):
    d = _copy(saved, tmp_path)
    _edit_tensors(d, edit)
    with pytest.raises(ValueError, match=message):
        Detector.load(d)


@pytest.mark.parametrize("edit, message", [
    (lambda i: i["scorer"].pop("top_k"), "scorer.top_k is missing"),
    (lambda i: i.update(threshold="abc"), "threshold must be int or float, got 'abc'"),
    (lambda i: i.update(threshold=float("nan")), "threshold is nan, not a finite number"),
    (lambda i: i.update(scorer=None), "scorer must be dict, got None"),
    (lambda i: i.update(num_layers=5), r"'means' is \[3, 1, 32\], expected \[5, 1, 32\]"),
    (lambda i: i.pop("frr"), "frr is missing"),
    (lambda i: i.update(frr=1.5), "frr must lie in"),
    (lambda i: i.update(mode="foo"), "mode 'foo' is not one of"),
    (lambda i: i["scorer"].update(layers=[7]), "scorer.layers must list layer indices in 0..2"),
    (lambda i: i.update(format_version=1), "detector format 1 is not 3"),
    (lambda i: i.pop("tensors_sha256"), "tensors_sha256 is missing"),
])
def test_json_contents_checked_on_load(saved, tmp_path, edit, message):
    d = _copy(saved, tmp_path)
    info = json.loads((d / "detector.json").read_text())
    edit(info)
    (d / "detector.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=message):
        Detector.load(d)


def test_json_that_is_not_json(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "detector.json").write_text("{not json")
    with pytest.raises(ValueError, match="detector.json is not valid JSON"):
        Detector.load(d)


def test_non_finite_scores_at_predict_time_raise_never_flag_nothing(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    det = Detector(mode="dup").fit(bert, clean)
    det.fitted_calibration.znorm.std.zero_()  # e.g. a detector corrupted in memory
    with pytest.raises(ValueError, match="60 of 60 scores .* are NaN or inf"):
        det.score(bert, pool)


# ---- empty or degenerate clean sets ------------------------------------------------------------------

def test_empty_clean_texts_are_an_error(bert):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="all 48 clean texts are empty"):
        detect_texts(bert, tok, tiny_texts(40, seed=2), clean_texts=[""] * 48, clean_labels=[i % 2 for i in range(48)])


def test_clean_rows_the_model_cannot_tell_apart_are_an_error(bert):
    same = batches([[1, 2, 3]] * 48, [i % 2 for i in range(48)])  # 48 copies of one input, through the loader API
    with pytest.raises(ValueError, match="constant over the 24 clean validation samples"):
        Detector(mode="dup").fit(bert, same)


def test_small_clean_set_warns_for_its_frr():
    model = tiny_bert(hidden=384, layers=2)
    with pytest.warns(UserWarning, match="too small for a 50% FRR: 2 calibration samples fit 384-dimensional"):
        Detector(mode="dup", frr=0.5).fit(model, batches(make_samples(5, seed=3), [0, 1, 0, 1, 0]))


# ---- options that were silently ignored -------------------------------------------------------------

def test_unknown_option_is_rejected_with_a_suggestion(bert, clean_and_pool):
    with pytest.raises(TypeError, match="'poolng' is not an option \\(did you mean 'pooling'\\?\\)"):
        Detector(poolng="cls")
    with pytest.raises(TypeError, match="'pool_trm' is not an option \\(did you mean 'pool_trim'\\?\\)"):
        dupfast.detect(bert, clean_and_pool[1], pool_trm=0.3)


def test_options_of_another_mode_are_rejected(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    with pytest.raises(TypeError, match="'top_k' is an option of mode 'dup', not of mode 'default'; 'alpha'"):
        dupfast.detect(bert, pool, clean=clean, top_k=5, alpha=0.2)
    with pytest.raises(TypeError, match="'signals' is an option of mode 'default', not of mode 'dan'"):
        Detector(mode="dan", signals=("pred",))


def test_options_this_call_would_not_use_are_rejected(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    with pytest.raises(TypeError, match="pool_trim .* runs only without a clean set"):
        dupfast.detect(bert, pool, clean=clean, pool_trim=0.3)
    det = Detector(mode="dup").fit(bert, clean)
    with pytest.raises(TypeError, match="mode, top_k would be ignored"):
        dupfast.detect(bert, pool, detector=det, mode="dan", top_k=2)
    with pytest.raises(TypeError, match="clean would be ignored"):
        dupfast.detect(bert, pool, clean=clean, detector=det)


# ---- the wrong model, labels or ids ------------------------------------------------------------------

def test_detector_meets_a_model_with_another_label_space(bert, clean_and_pool):
    clean, pool, _ = clean_and_pool
    det = Detector(mode="default").fit(bert, clean)
    with pytest.raises(ValueError, match="fitted on a 2-class model, this model has 3 classes"):
        det.score(tiny_bert(num_labels=3), pool)
    feats = {"cls": torch.randn(4, 3, 32), "mean": torch.randn(4, 3, 32),
             "attn": torch.rand(4, 1, det.scorer.tensors["attn.means"].shape[-1])}  # the reading token's attention
    with pytest.raises(ValueError, match="fitted on a 2-class model, these logits have 3 classes"):
        det.score_features(feats, torch.randn(4, 3))


def test_clean_labels_outside_the_models_label_space(bert):
    data = batches(make_samples(60, seed=1), [(3, 10)[i % 2] for i in range(60)])
    with pytest.raises(ValueError, match=r"labels \[3, 10\] lie outside the model's label space \[0, 2\)"):
        Detector().fit(bert, data)


def test_duplicate_ids(bert, clean_and_pool):
    clean, _, _ = clean_and_pool
    det = Detector(mode="dup").fit(bert, clean)
    pool = batches(make_samples(40, seed=2))
    pool[1]["index"] = pool[0]["index"].clone()
    with pytest.raises(ValueError, match="the pool has 8 repeated sample id\\(s\\) in its `index`/`idx` \\(0, 1, 2"):
        det.score(bert, pool)
    with pytest.raises(ValueError, match="the pool has 8 repeated"):
        Detector(mode="dup").fit_pool(bert, pool)
    dup_clean = [dict(b) for b in clean]
    dup_clean[1]["index"] = dup_clean[0]["index"].clone() + 16  # ids stay in 0..N-1 but repeat
    with pytest.raises(ValueError, match="the clean set has 8 repeated sample id"):
        Detector(mode="dup").fit(bert, dup_clean)


# ---- the text API boundary ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(texts=["w1 w2", None, "w3"]), TypeError, r"texts must all be strings: texts\[1\] is None"),
    (dict(clean_texts=[None] * 60, clean_labels=[0, 1] * 30), TypeError, r"clean texts\[0\] is None"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (dict(max_len=-3), ValueError, "max_len must be an int >= 1, got -3"),
    (dict(clean_texts=["w1"] * 40, clean_labels=[0, 1]), ValueError, "2 clean labels for 40 texts"),
    (dict(clean_labels=[0, 1]), ValueError, "clean_labels were given without clean_texts"),
    (dict(clean_texts=["w1"] * 40, clean_labels=[None] * 40), ValueError, r"clean labels\[0\] is None"),
    (dict(clean_texts=["w1"] * 40, clean_labels=[0.5] * 40), ValueError, r"clean labels\[0\] is 0.5"),
])
def test_text_api_errors(bert, kwargs, error, message):
    args = {"texts": tiny_texts(40, seed=2), **kwargs}
    with pytest.raises(error, match=message):
        detect_texts(bert, tiny_tokenizer(), **args)


# ---- the command line --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_tsv(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    return write_table(d / "clean.tsv", ["sentence", "label"], [(t, i % 2) for i, t in enumerate(tiny_texts(100, seed=1))], "\t")


def _pool(tmp_path, poison=None):
    texts = tiny_texts(25, seed=2) + tiny_texts(15, seed=3, trigger=True)
    if poison is None:
        return write_table(tmp_path / "pool.csv", ["text"], [(t,) for t in texts]), texts
    return write_table(tmp_path / "pool.csv", ["text", "poison_label"], [(t, poison(i)) for i, t in enumerate(texts)]), texts


def _detect(model_dir, pool, out, *extra):
    return main(["detect", str(model_dir), "--texts", str(pool), "--out", str(out), "--threads", "1", *extra])


def test_cli_all_clean_poison_labels_keep_the_scores(tmp_path, model_dir, clean_tsv, capsys):
    pool, texts = _pool(tmp_path, poison=lambda i: 0)
    out = tmp_path / "out"
    assert _detect(model_dir, pool, out, "--clean", str(clean_tsv)) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["text"] for r in rows] == texts
    report = json.loads((out / "detect.json").read_text())
    assert "auroc" not in report and "far" not in report and report["frr"] == report["flagged"] / 40
    assert "every poison_label is 0" in report["notes"][0]
    assert "note: every poison_label is 0" in capsys.readouterr().err
    assert (out / "detect_hist.png").is_file() and not (out / "detect_roc.png").exists()
    assert (out / "detector" / "detector.json").is_file()


def test_cli_poison_labels_that_are_not_0_1_keep_the_scores(tmp_path, model_dir, clean_tsv):
    pool, _ = _pool(tmp_path, poison=lambda i: i % 3)
    out = tmp_path / "out"
    assert _detect(model_dir, pool, out, "--clean", str(clean_tsv)) == 0
    assert len(list(csv.DictReader(open(out / "scores.csv")))) == 40
    report = json.loads((out / "detect.json").read_text())
    assert "auroc" not in report and "frr" not in report
    assert report["notes"] == ["poison_label must be 0 (clean) or 1 (poisoned), found [2]: no detection metrics"]


def test_cli_base_model_without_a_head_is_an_error(tmp_path, monkeypatch, clean_tsv, capsys):
    base = tiny_bert_dir(tmp_path / "base")  # a BertModel: no classification head
    monkeypatch.setitem(models._RESOLVERS, "tiny-base", lambda: base)
    pool, _ = _pool(tmp_path)
    # clean labels {3, 10} once built an 11-class random head here; now no head is built at all
    c310 = write_table(tmp_path / "c310.tsv", ["sentence", "label"], [(t, (3, 10)[i % 2]) for i, t in enumerate(tiny_texts(60, seed=1))], "\t")
    for name in ("tiny-base", str(base)):
        assert _detect(name, pool, tmp_path / "out", "--clean", str(c310)) == 2
        assert "has no fine-tuned classification head" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_clean_labels_outside_the_heads_classes(tmp_path, model_dir, capsys):
    pool, _ = _pool(tmp_path)
    c310 = write_table(tmp_path / "c310.tsv", ["sentence", "label"], [(t, (3, 10)[i % 2]) for i, t in enumerate(tiny_texts(60, seed=1))], "\t")
    assert _detect(model_dir, pool, tmp_path / "out", "--clean", str(c310)) == 2
    assert "labels [3, 10] lie outside the model's label space [0, 2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_options_that_would_be_ignored(tmp_path, model_dir, clean_tsv, saved, capsys):
    pool, _ = _pool(tmp_path)
    assert _detect(model_dir, pool, tmp_path / "a", "--clean", str(clean_tsv), "--pool-trim", "0.3") == 2
    assert "--pool-trim sets pool-only calibration" in capsys.readouterr().err
    assert _detect(model_dir, pool, tmp_path / "b", "--detector", str(saved), "--mode", "dan", "--frr", "0.1") == 2
    assert "--mode, --frr would be ignored" in capsys.readouterr().err


def test_cli_empty_clean_texts(tmp_path, model_dir, capsys):
    pool, _ = _pool(tmp_path)
    empty = write_table(tmp_path / "ce.tsv", ["sentence", "label"], [("", i % 2) for i in range(48)], "\t")
    assert _detect(model_dir, pool, tmp_path / "out", "--clean", str(empty)) == 2
    assert "all 48 clean texts are empty" in capsys.readouterr().err


def test_cli_out_with_an_earlier_run(tmp_path, model_dir, clean_tsv, capsys):
    pool, _ = _pool(tmp_path, poison=lambda i: int(i >= 25))
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("scores.csv", "earlier run"), ("detect_roc.png", "old"), ("mine.txt", "the user's")):
        (out / name).write_text(text)
    assert _detect(model_dir, pool, out, "--clean", str(clean_tsv)) == 2
    err = capsys.readouterr().err
    assert "already holds 3 entries (detect_roc.png, mine.txt, scores.csv): pass --overwrite" in err
    assert (out / "scores.csv").read_text() == "earlier run"  # untouched
    # with --overwrite: the earlier run's files are replaced or removed, the user's file stays
    pool, _ = _pool(tmp_path)  # no ground truth this time: no PNGs may be left over
    assert _detect(model_dir, pool, out, "--clean", str(clean_tsv), "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["detect.json", "detect_hist.png", "detector", "mine.txt",
                                                     "report.md", "scores.csv"]
    assert (out / "mine.txt").read_text() == "the user's"


def test_cli_out_that_is_a_file_fails_before_any_compute(tmp_path, model_dir, clean_tsv, monkeypatch, capsys):
    import dupfast.cli.detect as cli_detect
    monkeypatch.setattr(cli_detect, "load_classifier", lambda *a: pytest.fail("the model was loaded"))
    pool, _ = _pool(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    assert _detect(model_dir, pool, tmp_path / "afile", "--clean", str(clean_tsv)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _detect(model_dir, pool, tmp_path / "afile" / "sub", "--clean", str(clean_tsv)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_cli_overwrite_never_deletes_the_detector_it_reads(tmp_path, model_dir, clean_tsv, capsys):
    pool, _ = _pool(tmp_path)
    out = tmp_path / "out"
    assert _detect(model_dir, pool, out, "--clean", str(clean_tsv)) == 0
    assert _detect(model_dir, pool, out, "--detector", str(out / "detector"), "--overwrite") == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert (out / "detector" / "detector.json").is_file()


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--threads", "0"), ("--max-len", "-1"),
                                         ("--frr", "1.5"), ("--threads", "two")])
def test_cli_bad_numbers_are_argument_errors(tmp_path, model_dir, flag, value, capsys):
    pool, _ = _pool(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _detect(model_dir, pool, tmp_path / "out", flag, value)
    assert exc.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err

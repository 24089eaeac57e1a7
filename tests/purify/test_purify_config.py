"""PurifyConfig rejects bad values with a message naming the field (before any model work)."""
import math

import pytest
import torch

from dupfast.purification import PurifyConfig, purify


@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_asr": -0.1}, "lambda_asr must be a finite number >= 0"),
    ({"lambda_acc": -1.0}, "lambda_acc must be a finite number >= 0"),
    ({"lambda_keep": -1.0}, "lambda_keep must be a finite number >= 0"),
    ({"lambda_asr": 0.0, "lambda_acc": 0.0, "lambda_keep": 0.0}, "both 0"),
    ({"lambda_asr": 0.0, "lambda_acc": 0.0}, "both 0"),
    ({"lambda_asr": math.nan}, "lambda_asr"),
    ({"lambda_acc": math.inf}, "lambda_acc"),
    ({"temperature": 0.0}, "temperature"),
    ({"kl_cap": 0.0}, "kl_cap"),
    ({"start": "jump"}, "start must be one of"),
    ({"lora_r": 0}, "lora_r"),
    ({"batch_size": 0}, "batch_size"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"holdout_fraction": 1.0}, "holdout_fraction"),
    ({"agree_bound": 1.5}, "agree_bound"),
    ({"max_steps": 0}, "max_steps"),
    ({"min_steps": -1}, "min_steps"),
    ({"min_steps": 2.5}, "min_steps"),
    ({"patience": 0}, "patience"),
    ({"patience": -1.5}, "patience must be a number of epochs"),
    ({"patience": True}, "patience"),
    ({"target_modules": []}, "target_modules"),
])
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PurifyConfig(**kwargs)


def test_lambda_asr_zero_alone_is_allowed():
    cfg = PurifyConfig(lambda_asr=0.0)  # clean LoRA fine-tuning, the authors' committed ablation
    assert cfg.lambda_asr == 0.0 and cfg.lambda_acc == 1.0


def test_purify_validates_lambdas_before_touching_the_model():
    model = torch.nn.Linear(2, 2)  # would fail later; the λ check must come first
    with pytest.raises(ValueError, match="both 0"):
        purify(model, [], clean=[], detection=[], lambda_asr=0.0, lambda_acc=0.0)
    with pytest.raises(ValueError, match="lambda_asr must be"):
        purify(model, [], clean=[], detection=[], lambda_asr=-1.0)


def test_config_round_trips_to_plain_dict():
    d = PurifyConfig(target_modules=["query", "value"]).to_dict()
    assert d["target_modules"] == ["query", "value"]
    assert PurifyConfig(**{**d, "target_modules": tuple(d["target_modules"])}) == \
        PurifyConfig(target_modules=("query", "value"))


def test_purify_is_a_plain_function_over_the_purification_package():
    import subprocess
    import sys
    import types

    import dupfast
    import dupfast.purification as package
    assert isinstance(dupfast.purify, types.FunctionType) and dupfast.purify is package.purify
    assert type(package) is types.ModuleType  # no callable-module class
    code = ("import sys, dupfast; assert 'torch' not in sys.modules; import types; "
            "assert isinstance(dupfast.purify, types.FunctionType); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

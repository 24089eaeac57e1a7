"""FinetuneConfig (BTU's rounds, victims) type-checks its fields: a string lr used to fail as a raw "'>' not supported
between instances of 'str' and 'int'" before BTUConfig ever saw it (issue 31)."""
import dataclasses

import numpy as np
import pytest

from dupfast.btu import BTUConfig, ExposureConfig
from dupfast.btu.train import FINETUNE
from dupfast.finetune import FinetuneConfig
from dupfast.harness.victims import VictimConfig


@pytest.mark.parametrize("field, value, message", [
    ("lr", "2e-5", r"FinetuneConfig\.lr must be a number, got '2e-5' \(str\), e\.g\. lr=5e-05"),
    ("lr", None, r"FinetuneConfig\.lr must be a number, got None \(NoneType\)"),
    ("epochs", 2.0, r"FinetuneConfig\.epochs must be an int, got 2\.0 \(float\), e\.g\. epochs=2"),
    ("batch_size", "64", r"FinetuneConfig\.batch_size must be an int, got '64' \(str\)"),
    ("max_len", 64.5, r"FinetuneConfig\.max_len must be an int, got 64\.5"),
    ("warmup_ratio", "0.1", r"FinetuneConfig\.warmup_ratio must be a number, got '0\.1'"),
    ("weight_decay", "0.01", r"FinetuneConfig\.weight_decay must be a number, got '0\.01'"),
    ("grad_clip", [1.0], r"FinetuneConfig\.grad_clip must be a number, got \[1\.0\] \(list\)"),
    ("seed", True, r"FinetuneConfig\.seed must be an int, got True \(bool\)"),  # a bool is not a seed
])
def test_wrong_types_name_the_field_and_an_example(field, value, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**{field: value})


def test_a_string_lr_for_btu_fails_where_the_round_is_built():
    # the ways a BTU user builds a round: a fresh config, or a change of the default one
    with pytest.raises(ValueError, match=r"FinetuneConfig\.lr must be a number, got '2e-5'"):
        BTUConfig(finetune=FinetuneConfig(epochs=1, lr="2e-5"))
    with pytest.raises(ValueError, match=r"FinetuneConfig\.lr must be a number, got '2e-5'"):
        dataclasses.replace(FINETUNE, lr="2e-5")
    with pytest.raises(ValueError, match=r"FinetuneConfig\.epochs must be an int, got '1'"):
        ExposureConfig(shallow=FinetuneConfig(epochs="1"))
    # a subclass names itself
    with pytest.raises(ValueError, match=r"VictimConfig\.lr must be a number, got '1e-4'"):
        VictimConfig(lr="1e-4")


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), r"lr must be a finite number > 0, got nan"),
    ("lr", float("inf"), r"lr must be a finite number > 0, got inf"),
    ("lr", 0, r"lr must be a finite number > 0, got 0"),
    ("weight_decay", -0.01, r"weight_decay must be a finite number >= 0, got -0\.01"),
    ("grad_clip", 0.0, r"grad_clip must be > 0, got 0\.0"),
    ("grad_clip", float("nan"), r"grad_clip must be > 0, got nan"),
    ("epochs", 0, r"epochs must be >= 1, got 0"),
])
def test_values_out_of_range_are_errors(field, value, message):
    with pytest.raises(ValueError, match=r"FinetuneConfig\." + message):
        FinetuneConfig(**{field: value})


def test_numbers_of_any_numeric_type_are_accepted():
    # numpy scalars (a sweep's np.logspace) and an int lr are numbers; the check is on kind, not on exact type
    cfg = FinetuneConfig(epochs=np.int64(1), lr=np.float64(2e-5), batch_size=8, max_len=16, warmup_ratio=0,
                         weight_decay=np.float32(0.01), grad_clip=1, seed=np.int32(3))
    assert cfg.epochs == 1 and cfg.lr == 2e-5 and cfg.grad_clip == 1
    assert FinetuneConfig(lr=1).lr == 1 and VictimConfig(model="minilm").model == "minilm"
    assert BTUConfig().finetune == FINETUNE  # the shipped rounds still pass

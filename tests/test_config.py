"""`--key=value` overrides of dataclass configs."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import ConfigError, apply_overrides


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class DataConfig:
    lr: float = 0.0  # same leaf name as OptimConfig.lr, to test ambiguity
    path: str = "embedded:fashion_mnist"


@dataclass
class RunConfig:
    max_steps: int = 10
    tokenizer: str | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


def test_overrides_by_leaf_and_dotted_path():
    cfg = apply_overrides(RunConfig(), [
        "--max_steps=1e3", "--optim.lr=2e-3", "--betas=0.9,0.95", "--precision=bf16", "--compile=true",
        "--tokenizer=none", "--path=/data/x", "--local_rank=0",
    ])
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.precision == "bf16" and cfg.compile is True and cfg.tokenizer is None
    assert cfg.data.path == "/data/x"


@pytest.mark.parametrize("argv, message", [
    (["--max_step=3"], "unknown config key --max_step (did you mean --max_steps"),
    (["--max_steps=3.5"], "expected int"),
    (["--precision=fp8"], "expected one of ['fp32', 'bf16', 'fp16']"),
    (["--compile=maybe"], "expected a boolean"),
    (["--betas=0.9"], "expected 2 comma-separated values"),
    (["--lr=1"], "ambiguous"),
    (["max_steps=3"], "overrides are written --key=value"),
])
def test_bad_overrides_are_clear_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), argv)
    assert message in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*optim.lr"):
        apply_overrides(RunConfig(), ["--nonsense=1"])


def test_a_config_error_raised_in_a_dataloader_worker_prints_its_own_line(capsys):
    from engine.config import config_errors_exit

    wrapped = ("Caught ConfigError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in <module>\nengine.config.ConfigError: a.png: label 200 is outside [0, 150)')
    with pytest.raises(SystemExit) as stop, config_errors_exit():
        raise ConfigError(wrapped)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: a.png: label 200 is outside [0, 150)\n"

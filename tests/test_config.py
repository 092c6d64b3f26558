"""`--key=value` overrides of dataclass configs, `--key value`, and `--config=FILE` (TOML or a run's config.json)."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import ConfigError, apply_overrides, config_to_dict, save_config


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
    (["max_steps=3"], "overrides are written --key=value or --key value"),
    (["--max_steps"], "--max_steps needs a value"),
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


def test_space_separated_values_and_bare_boolean_flags():
    cfg = apply_overrides(RunConfig(), ["--max_steps", "64", "--compile", "--optim.lr", "-1e-3", "--tokenizer",
                                        "none", "--betas", "0.9,0.95"])
    assert cfg.max_steps == 64 and cfg.compile is True and cfg.optim.lr == -1e-3 and cfg.tokenizer is None
    assert cfg.optim.betas == (0.9, 0.95)


def test_toml_config_file_with_tables_and_bare_keys_then_the_command_line_on_top(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 50\ncompile = true\npath = "/data/in1k"\n\n[optim]\nlr = 5e-4\n'
                    'betas = [0.9, 0.98]\n')
    cfg = apply_overrides(RunConfig(), ["--max_steps=7", f"--config={path}"])  # the command line wins, wherever
    assert cfg.max_steps == 7 and cfg.compile is True and cfg.data.path == "/data/in1k"
    assert cfg.optim.lr == 5e-4 and cfg.optim.betas == (0.9, 0.98)
    assert apply_overrides(RunConfig(), ["--config", str(path)]).max_steps == 50


def test_a_saved_config_json_round_trips(tmp_path):
    changed = apply_overrides(RunConfig(), ["--max_steps=9", "--tokenizer=tok", "--precision=bf16",
                                            "--optim.lr=0.01", "--betas=0.8,0.9"])
    save_config(changed, tmp_path / "config.json")
    assert config_to_dict(apply_overrides(RunConfig(), [f"--config={tmp_path / 'config.json'}"])) == \
        config_to_dict(changed)


@pytest.mark.parametrize("text, suffix, message", [
    ("[optim]\nlr = 1e-3\nmomentum = 0.9\n", ".toml", "run.toml: unknown config key --optim.momentum"),
    ("max_steps = 'many'\n", ".toml", "run.toml: --max_steps=many: expected int"),
    ("max_steps = \n", ".toml", "run.toml: not valid TOML"),
    ('{"max_steps": 3,}', ".json", "run.json: not valid JSON"),
    ("[1, 2]", ".json", "expected a table of keys, found list"),
])
def test_bad_config_files_are_clear_errors_naming_the_file(tmp_path, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [f"--config={path}"])
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        apply_overrides(RunConfig(), [f"--config={tmp_path / 'absent.toml'}"])

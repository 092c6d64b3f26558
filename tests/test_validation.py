"""Bad config values are caught when the command line is parsed: one line on stderr, exit status 2, nothing started;
`--help` documents every key; `precision=auto` resolves per device."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV
from PIL import Image

from engine.config import _leaves, field_docs, format_help, parse_overrides
from engine.train import validation
from engine.train.settings import FinetuneConfig, PretrainConfig, RunSettings

ROOT = Path(__file__).resolve().parents[1]


def pretrain_config() -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model.model, cfg.model.input_size = "beit_mini_patch4_28_256_vocab", 28
    cfg.data.data_path, cfg.data.num_mask_patches, cfg.data.min_mask_patches = "embedded:fashion_mnist", 20, 4
    return cfg


def finetune_config() -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.model, cfg.model.input_size, cfg.data.data_path = "beit_mini_patch4_28", 28, "embedded:fashion_mnist"
    return cfg


BAD_PRETRAIN = [
    ("--batch_size=-5", "--batch_size=-5: must be >= 1"),
    ("--epochs=0", "--epochs=0: must be >= 1"),
    ("--max_steps=0", "must be > 0 (or -1: no limit)"),
    ("--data_path=/does/not/exist", "--data_path=/does/not/exist: no such folder"),
    ("--data_path=embedded:cifar", "expected one of embedded:fashion_mnist"),
    ("--tokenizer=/does/not/exist", "tokenizer directory /does/not/exist does not exist: train one with"),
    ("--precision=fp16", "fp16 needs a CUDA device"),
    ("--precision=fp8", "expected one of ['auto', 'fp32', 'bf16', 'fp16']"),
    ("--device=tpu", "expected one of ['auto', 'cuda', 'cpu']"),
    ("--attn_impl=flash", "expected one of ['eager', 'sdpa', 'triton']"),
    ("--zero_stage=4", "--zero_stage=4: expected 0, 1, 2 or 3"),
    ("--offload=true", None),  # fine at the default zero_stage=1
    ("--zero_stage=0 --offload=true", "--offload=True: needs --zero_stage=1, 2 or 3"),
    ("--global_batch=100", "--global_batch=100: must be a multiple of batch_size × ranks = 64 × 1"),
    ("--lr=0", "--lr=0.0: must be > 0"),
    ("--layer_decay=1.5", "--layer_decay=1.5: must be in (0, 1]"),
    ("--drop_path=1", "--drop_path=1.0: must be in [0, 1)"),
    ("--model=beit_huge", "--model=beit_huge: not a registered model"),
    ("--input_size=30", "--input_size=30: must be a positive multiple of beit_mini_patch4_28_256_vocab's patch size 4"),
    ("--num_mask_patches=49", "--num_mask_patches=49: must be in [1, 48]"),
    ("--min_mask_patches=30", "--min_mask_patches=30: must be in [1, num_mask_patches=20]"),
    ("--min_crop_scale=0", "--min_crop_scale=0.0: must be in (0, 1]"),
    ("--num_workers=-1", "--num_workers=-1: must be >= 0"),
    ("--output_dir=", "--output_dir=: must name a directory"),
]


@pytest.mark.parametrize("args, message", BAD_PRETRAIN)
def test_bad_pretrain_values_exit_2_with_one_line(args, message, capsys):
    if message is None:
        parse_overrides(pretrain_config(), args.split())
        return
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), args.split())
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("args, message", [
    ("--finetune=/no/such/weights", "--finetune=/no/such/weights: checkpoint not found"),
    ("--reprob=2", "--reprob=2.0: must be in [0, 1]"),
    ("--smoothing=1", "--smoothing=1.0: must be in [0, 1)"),
    ("--auto_augment=rand-x9", "--auto_augment=rand-x9: unknown RandAugment section"),
    ("--mixup=-1", "--mixup=-1.0: must be >= 0"),
    ("--model_ema_decay=1", "--model_ema_decay=1.0: must be in (0, 1)"),
    ("--eval_every=0", "--eval_every=0: must be >= 1"),
    ("--crop_pct=0", "--crop_pct=0.0: must be in (0, 1]"),
])
def test_bad_finetune_values_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_overrides(finetune_config(), args.split())
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=SUBPROCESS_ENV)


def test_recipe_rejects_a_bad_value_before_any_work():
    """Finding: `--run.batch_size=-5` used to be accepted and fail after minutes of tokenizer training."""
    proc = run_recipe("recipes/pretrain_demo.py", "--run.batch_size=-5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --batch_size=-5: must be >= 1"
    assert "Traceback" not in proc.stderr and "tokenizer" not in proc.stdout


def test_dataset_smaller_than_one_batch_and_empty_folder(tmp_path):
    """Findings: a dataset smaller than one batch, and a folder with no readable image, ended in a traceback."""
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(small / f"{i}.png")
    proc = run_recipe("recipes/pretrain_demo.py", f"--data_path={small}", "--batch_size=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "holds 3 training images, fewer than one global batch of 4: lower --batch_size")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    proc = run_recipe("recipes/pretrain_demo.py", f"--data_path={empty}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no readable image files" in proc.stderr.strip().splitlines()[-1]


def test_cpu_smoke_of_the_large_recipe_names_the_batch_layout(tokenizer_dir, tmp_path):
    """Finding 11: a CPU smoke run of pretrain_large (global batch 2048 at --batch_size=4 on 1 rank) ended in a
    `[rank0]` traceback. Now: one line naming the keys to change, exit 2."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(folder / f"{i}.png")
    proc = run_recipe("recipes/pretrain_large.py", f"--data_path={folder}", f"--tokenizer={tokenizer_dir}",
                      "--depth=2", "--batch_size=4", "--input_size=112", "--second_input_size=14",
                      "--num_mask_patches=20", "--min_mask_patches=4", f"--output_dir={tmp_path / 'run'}",
                      "--num_workers=0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "accelerator" not in proc.stderr  # finding 7: no "unable to detect a GPU" message on a CPU machine
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: one epoch holds 2 micro-batches of 4 per rank, fewer than grad_accum=512: lower --batch_size, "
        "--grad_accum or --global_batch")


def test_a_folder_that_is_not_a_tokenizer_is_rejected_when_parsed(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), [f"--tokenizer={tmp_path}"])
    assert stop.value.code == 2 and "is not a tokenizer directory (no tokenizer.json)" in capsys.readouterr().err


def test_precision_auto_resolves_per_device(monkeypatch):
    run = RunSettings(device="cpu")
    assert run.precision == "auto"
    monkeypatch.setattr(validation, "cpu_has_native_bf16", lambda: False)
    validation.resolve_precision(run)
    assert run.precision == "fp32"
    run = RunSettings(device="cpu")
    monkeypatch.setattr(validation, "cpu_has_native_bf16", lambda: True)
    validation.resolve_precision(run)
    assert run.precision == "bf16"


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_measured_cost(monkeypatch, caplog):
    monkeypatch.setattr(validation, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="engine.train.validation"):
        validation.check_run(RunSettings(device="cpu", precision="bf16"))
    (record,) = caplog.records
    assert "measured" in record.getMessage() and "slower than fp32" in record.getMessage()


def test_help_documents_every_key_by_section():
    """Finding 6: `--help` listed dotted names with no descriptions, defaults or units."""
    for cfg in (PretrainConfig(), FinetuneConfig()):
        undocumented = [path for path, (owner, field) in _leaves(cfg).items()
                        if not field_docs(type(owner)).get(field.name)]
        assert not undocumented, f"fields without a description comment: {undocumented}"
    text = format_help(PretrainConfig())
    assert "[run]" in text and "[optim]" in text
    assert "  --batch_size (--run.batch_size): int = 64  # per device, per micro-step" in text
    assert "--precision (--run.precision): auto|fp32|bf16|fp16 = 'auto'" in text


def test_help_from_a_recipe_exits_0():
    proc = run_recipe("recipes/finetune_demo.py", "--help")
    assert proc.returncode == 0 and "[data]" in proc.stdout and "--finetune (--data.finetune)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    ("--attn_impl=triton", "--attn_impl=triton: runs Triton kernels, which need a CUDA device (this run's device is "
                           "cpu): use --attn_impl=sdpa"),
    ("--mlm_loss=fused", "--mlm_loss=fused: runs Triton kernels, which need a CUDA device (this run's device is cpu): "
                         "use --mlm_loss=reference (or auto)"),
])
def test_triton_backends_on_a_cpu_run_are_refused_when_parsed(args, message, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), [args, "--device=cpu"])
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_mlm_loss_auto_resolves_once_per_device(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = pretrain_config()
    assert cfg.model.mlm_loss == "auto"
    with caplog.at_level(logging.INFO, logger="engine.train.validation"):
        parse_overrides(cfg, ["--device=cpu"])
    assert cfg.model.mlm_loss == "reference" and "mlm_loss=auto → reference (device cpu)" in caplog.text
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter allows an explicit fused, but auto stays on PyTorch
    cfg = pretrain_config()
    parse_overrides(cfg, ["--device=cpu", "--mlm_loss=fused"])
    assert cfg.model.mlm_loss == "fused"
    cfg = pretrain_config()
    parse_overrides(cfg, ["--device=cpu"])
    assert cfg.model.mlm_loss == "reference"

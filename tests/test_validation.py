"""Bad config values are caught when the command line is parsed: one line on stderr, exit status 2, nothing started;
`--help` documents every key; what `auto` stands for is resolved once, per device (engine/train/resolve.py)."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_ENV
from PIL import Image

from engine.config import _leaves, field_docs, format_help, parse_overrides
from engine.train import resolve, validation
from engine.train.settings import FinetuneConfig, PretrainConfig, RunSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pretrain_config(tokenizer_dir):
    """A factory of small pretraining configs that pass validation."""
    return lambda: _pretrain_config(tokenizer_dir)


def _pretrain_config(tokenizer_dir) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model.model, cfg.model.input_size, cfg.data.tokenizer = "beit_mini_patch4_28_256_vocab", 28, str(tokenizer_dir)
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
    ("--tokenizer=", "--tokenizer=: required: a tokenizer directory"),
]


@pytest.mark.parametrize("args, message", BAD_PRETRAIN)
def test_bad_pretrain_values_exit_2_with_one_line(args, message, pretrain_config, capsys):
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
    ("--model_ema=true --zero_stage=3", "--model_ema=True: needs --zero_stage=0, 1 or 2"),
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
    """`--run.batch_size=-5` was once accepted and fail after minutes of tokenizer training."""
    proc = run_recipe("recipes/pretrain_demo.py", "--run.batch_size=-5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --batch_size=-5: must be >= 1"
    assert "Traceback" not in proc.stderr and "tokenizer" not in proc.stdout


@pytest.mark.slow
def test_dataset_smaller_than_one_batch_and_empty_folder(tmp_path):
    """A dataset smaller than one batch, and a folder with no readable image, end in one line (once: tracebacks)."""
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


@pytest.mark.slow
def test_cpu_smoke_of_the_large_recipe_names_the_batch_layout(tokenizer_dir, tmp_path):
    """A CPU smoke run of pretrain_large (global batch 2048 at --batch_size=4 on 1 rank) ended in a
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
    assert "accelerator" not in proc.stderr  # no "unable to detect a GPU" message on a CPU machine
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: one epoch holds 2 micro-batches of 4 per rank, fewer than grad_accum=512: lower --batch_size, "
        "--grad_accum or --global_batch")


def test_a_folder_that_is_not_a_tokenizer_is_rejected_when_parsed(tmp_path, pretrain_config, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), [f"--tokenizer={tmp_path}"])
    assert stop.value.code == 2 and "is not a tokenizer directory (no tokenizer.json)" in capsys.readouterr().err


def test_precision_auto_resolves_per_device(monkeypatch):
    monkeypatch.setattr(resolve, "cpu_has_native_bf16", lambda: False)
    assert resolve.resolved_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(resolve, "cpu_has_native_bf16", lambda: True)
    assert resolve.resolved_precision("auto", "cpu") == "bf16"
    assert resolve.resolved_precision("fp32", "cpu") == "fp32"


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_measured_cost(monkeypatch, caplog):
    monkeypatch.setattr(validation, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="engine.train.validation"):
        validation.check_run(RunSettings(device="cpu", precision="bf16"))
    (record,) = caplog.records
    assert "measured" in record.getMessage() and "slower than fp32" in record.getMessage()


def test_help_documents_every_key_by_section():
    """`--help` gives every key a description, a default and a type."""
    for cfg in (PretrainConfig(), FinetuneConfig()):
        undocumented = [path for path, (owner, field) in _leaves(cfg).items()
                        if not field_docs(type(owner)).get(field.name)]
        assert not undocumented, f"fields without a description comment: {undocumented}"
    text = format_help(PretrainConfig())
    assert "[run]" in text and "[optim]" in text
    assert "  --batch_size (--run.batch_size): int = 64  # per device, per micro-step" in text
    assert "--precision (--run.precision): auto|fp32|bf16|fp16 = 'auto'" in text


@pytest.mark.slow
def test_help_from_a_recipe_exits_0():
    proc = run_recipe("recipes/finetune_demo.py", "--help")
    assert proc.returncode == 0 and "[data]" in proc.stdout and "--finetune (--data.finetune)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    ("--attn_impl=triton", "--attn_impl=triton: runs Triton kernels, which need a CUDA device (this run's device is "
                           "cpu): use --attn_impl=sdpa"),
    ("--mlm_loss=fused", "--mlm_loss=fused: runs Triton kernels, which need a CUDA device (this run's device is cpu): "
                         "use --mlm_loss=reference (or auto)"),
])
def test_triton_backends_on_a_cpu_run_are_refused_when_parsed(args, message, pretrain_config, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), [args, "--device=cpu"])
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_validation_only_checks_and_the_resolve_step_fills_in_auto(pretrain_config, monkeypatch, caplog):
    """Parsing leaves `auto` and the accumulation as given; `resolve_config` writes the device, the precision, the
    masked-token loss and grad_accum once (the run's config.json records them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(resolve, "cpu_has_native_bf16", lambda: False)
    cfg = parse_overrides(pretrain_config(), ["--device=auto", "--global_batch=128", "--batch_size=32"])
    before = (cfg.run.device, cfg.run.precision, cfg.model.mlm_loss, cfg.run.grad_accum)
    assert before == ("auto", "auto", "auto", 1)
    with caplog.at_level(logging.INFO, logger="engine.train.resolve"):
        resolve.resolve_config(cfg, world_size=2)
    assert (cfg.run.device, cfg.run.precision, cfg.model.mlm_loss, cfg.run.grad_accum) == ("cpu", "fp32",
                                                                                            "reference", 2)
    assert "mlm_loss=auto → reference (device cpu)" in caplog.text
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter allows an explicit fused, but auto stays on PyTorch
    cfg = parse_overrides(pretrain_config(), ["--device=cpu", "--mlm_loss=fused"])
    resolve.resolve_config(cfg, world_size=1)
    assert cfg.model.mlm_loss == "fused"
    cfg = parse_overrides(pretrain_config(), ["--device=cpu"])
    resolve.resolve_config(cfg, world_size=1)
    assert cfg.model.mlm_loss == "reference"


def test_model_keys_are_the_ones_each_task_uses():
    """Fine-tuning and segmentation list no pretraining-only key (they would be ignored), and the layer-scale init
    that fine-tuning lists reaches the model it builds (None keeps the registered one)."""
    from engine.config import ConfigError, apply_overrides
    from engine.factory import create_model
    from engine.train.settings import ModelSettings, SegmentationConfig

    for cfg in (FinetuneConfig(), SegmentationConfig()):
        for key in ("--mlm_loss=fused", "--use_shared_rel_pos_bias=false"):
            with pytest.raises(ConfigError, match=f"unknown config key {key.split('=')[0]}"):
                apply_overrides(cfg, [key])
    settings = ModelSettings(model="beit_mini_patch4_28", input_size=28, depth=1, layer_scale_init_value=0.3)
    model = create_model(settings.model, num_classes=3, **settings.create_kwargs())
    assert all(torch.all(p == 0.3) for name, p in model.named_parameters() if "gamma" in name)
    assert "layer_scale_init_value" not in ModelSettings().create_kwargs()


def test_finetuning_data_of_one_class_exits_2_with_one_line(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (28, 28), (i * 40, 0, 0)).save(tmp_path / split / "only" / f"{i}.png")
    proc = run_recipe("recipes/finetune_demo.py", f"--data_path={tmp_path}", "--finetune=", "--batch_size=2",
                      "--num_workers=0", f"--output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --data_path={tmp_path}: 1 class(es); fine-tuning needs labelled data of two or more classes (class "
        "subfolders under train/, or IDX labels)")


def test_zero3_segmentation_is_refused_on_several_ranks_only(tmp_path, monkeypatch, capsys):
    from engine.train.settings import SegmentationConfig

    for sub in ("images/training", "annotations/training", "images/validation", "annotations/validation"):
        (tmp_path / sub).mkdir(parents=True)
    args = [f"--data_path={tmp_path}", "--zero_stage=3", "--device=cpu", "--global_batch=none"]
    parse_overrides(SegmentationConfig(), args)  # one rank: nothing to mismatch
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as stop:
        parse_overrides(SegmentationConfig(), args)
    assert stop.value.code == 2 and "on several ranks supports ZeRO 0-2" in capsys.readouterr().err


def test_the_global_batch_is_checked_against_the_ranks_srun_starts(pretrain_config, monkeypatch, capsys):
    """srun sets SLURM_* and no WORLD_SIZE before the process group forms: the check reads the launcher's count."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "32")
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), ["--global_batch=2048", "--batch_size=128"])
    assert stop.value.code == 2 and "must be a multiple of batch_size × ranks = 128 × 32" in capsys.readouterr().err
    cfg = parse_overrides(pretrain_config(), ["--global_batch=2048", "--batch_size=16", "--device=cpu"])
    resolve.resolve_config(cfg, world_size=32)
    assert cfg.run.grad_accum == 4


def test_layer_decay_is_refused_for_pretraining(pretrain_config, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_overrides(pretrain_config(), ["--layer_decay=0.65"])
    assert stop.value.code == 2 and "fine-tuning and segmentation only" in capsys.readouterr().err

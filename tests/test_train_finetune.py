"""Fine-tuning on the embedded labelled images with a tiny model: a run from pretrained weights (mixup + EMA),
resume exactness, linear probe (frozen backbone)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_finetune_demo
from safetensors.torch import load_file

from engine.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth=2", "--batch_size=16", "--epochs=1", "--max_steps=4", "--log_every=1", "--num_workers=0",
        "--progress=false", "--eval_batch_size=500", "--mixup=0.8", "--cutmix=1.0", "--seed=1"]


def run(output_dir: Path, *extra: str) -> dict:
    return run_finetune_demo(output_dir, *TINY, *extra)


@pytest.mark.slow
def test_finetune_from_pretrained_with_mixup_and_ema(pretrained_dir, tmp_path):
    summary = run(tmp_path, f"--finetune={pretrained_dir}", "--model_ema=true", "--model_ema_decay=0.5")
    evals = summary["evals"]
    assert len(evals) == 1 and 0 <= evals[0]["acc1"] <= evals[0]["acc5"] <= 100 and "ema_acc1" in evals[0]
    assert (tmp_path / "best" / "model.safetensors").is_file() and (tmp_path / "final" / "config.json").is_file()
    assert (tmp_path / "latest").is_file() and (tmp_path / "curves.png").is_file()
    final = load_file(tmp_path / "final" / "model.safetensors")
    pretrained = load_file(pretrained_dir / "model.safetensors")
    # the shared table was expanded into every block, then trained
    assert final["blocks.1.attn.relative_position_bias_table"].shape == \
        pretrained["rel_pos_bias.relative_position_bias_table"].shape


@pytest.mark.slow
def test_finetune_resume_is_exact(pretrained_dir, tmp_path):
    reference = tmp_path / "reference"
    run(reference, f"--finetune={pretrained_dir}")
    resumed = tmp_path / "resumed"
    run(resumed, f"--finetune={pretrained_dir}", "--max_steps=2")
    run(resumed, f"--finetune={pretrained_dir}")
    losses = [[r["loss"] for r in read_metrics(out / "metrics.jsonl")] for out in (reference, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_linear_probe_trains_only_the_head(pretrained_dir, tmp_path):
    run(tmp_path, f"--finetune={pretrained_dir}", "--linear_probe=true", "--max_steps=2", "--layer_decay=none")
    final = load_file(tmp_path / "final" / "model.safetensors")
    pretrained = load_file(pretrained_dir / "model.safetensors")
    assert torch.equal(final["blocks.0.mlp.fc1.weight"], pretrained["blocks.0.mlp.fc1.weight"])
    assert torch.equal(final["patch_embed.proj.weight"], pretrained["patch_embed.proj.weight"])
    assert "head.weight" in final
    from engine.checkpoint import read_preprocessing

    record = read_preprocessing(tmp_path / "final")  # travels with the weights: the demo's 0.5/0.5, crop, classes
    assert record["mean"] == [0.5] * 3 and record["crop_pct"] == 1.0 and len(record["class_names"]) == 10


@pytest.mark.slow
def test_compiled_finetuning_saves_a_best_checkpoint_that_loads(pretrained_dir, tmp_path, monkeypatch):
    """torch.compile wraps the model (`_orig_mod.`): best/ and final/ must still hold the model's own names."""
    from engine.checkpoint import create_model_from_checkpoint

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # inductor compiles the PyTorch paths, not the interpreter
    run(tmp_path, f"--finetune={pretrained_dir}", "--compile=true", "--max_steps=2", "--mixup=0", "--cutmix=0")
    for name in ("best", "final"):
        state = load_file(tmp_path / name / "model.safetensors")
        assert not any("_orig_mod" in key or key.startswith("model.") for key in state), name
        model = create_model_from_checkpoint(tmp_path / name)
        assert model.config["depth"] == 2


@pytest.mark.slow
def test_first_ctrl_c_stops_the_whole_finetune_demo_and_a_rerun_finishes_both_arms(pretrained_dir, tmp_path):
    """Once: the first Ctrl-C stopped only the pretrained arm, the scratch arm started, and stopping that ended
    in `KeyError: 'evals'`. Now the first SIGINT (to the whole process group, as a terminal sends it) saves and stops
    the demo; a rerun resumes the stopped arm and then runs the other."""
    import os
    import signal
    import subprocess
    import time

    from conftest import SUBPROCESS_ENV

    args = [sys.executable, str(ROOT / "recipes" / "finetune_demo.py"), *TINY, "--max_steps=40", "--mixup=0",
            "--cutmix=0", f"--finetune={pretrained_dir}", f"--output_dir={tmp_path}"]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV, start_new_session=True)
        deadline = time.time() + 300
        while not (tmp_path / "from_pretrained" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 1
    text = log_path.read_text()
    assert "stopped during the pretrained arm; run the same command again to resume it" in text
    assert "Traceback" not in text and not (tmp_path / "from_scratch").exists()
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from" in rerun.stderr and "pretrained: top-1" in rerun.stdout and "scratch: top-1" in rerun.stdout


@pytest.mark.slow
def test_zero3_finetuning_starts_from_the_pretrained_weights_and_saves_best_and_final(pretrained_dir, tmp_path):
    """At ZeRO-3 the model is built partitioned (deepspeed.zero.Init); --finetune is loaded into it gathered."""
    run(tmp_path, f"--finetune={pretrained_dir}", "--zero_stage=3")
    final = load_file(tmp_path / "final" / "model.safetensors")["patch_embed.proj.weight"]
    pretrained = load_file(pretrained_dir / "model.safetensors")["patch_embed.proj.weight"]
    assert (final - pretrained).norm() < 0.5 * pretrained.norm()  # 4 small steps; a random init is ~1.4× away
    assert (tmp_path / "best" / "model.safetensors").is_file()


def _train_only_folder(root: Path) -> Path:
    """An image folder with train/ only (no val/): ImageNet-22k's layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(2):
        for index in range(8):
            pixels = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
            path = root / "train" / f"class_{label}" / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


@pytest.mark.slow
def test_finetuning_without_an_evaluation_split(tmp_path):
    """--disable_eval_during_finetuning (ImageNet-22k intermediate fine-tuning): no val/ needed, no evaluation, final/
    and no best/; without the flag, a missing split is one clear error naming the flag."""
    from engine.config import ConfigError

    data = _train_only_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="disable_eval_during_finetuning"):
        run(tmp_path / "evaluated", f"--data_path={data}", "--finetune=", "--max_steps=1")
    summary = run(tmp_path / "run", f"--data_path={data}", "--finetune=", "--disable_eval_during_finetuning=true",
                  "--batch_size=4", "--max_steps=2", "--layer_decay=none")
    assert summary["best"] is None and summary["evals"] == [] and summary["best_dir"] is None
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and not (tmp_path / "run" / "best").exists()


def test_in22k_recipes_build_the_official_schedules():
    sys.path.insert(0, str(ROOT / "recipes"))
    from finetune_in22k import config as finetune_config
    from pretrain_in22k import config as pretrain_config

    large = finetune_config("large")
    assert large.extras.disable_eval_during_finetuning and large.run.global_batch == 2048
    assert (large.optim.lr, large.optim.layer_decay, large.optim.clip_grad, large.run.epochs) == (2e-3, 0.75, 1.0, 90)
    base = finetune_config("base")
    assert (base.run.global_batch, base.optim.lr, base.optim.clip_grad, base.model.drop_path) == (4096, 3e-3, 3.0, 0.2)
    pretrain = pretrain_config("large")
    assert (pretrain.optim.warmup_steps, pretrain.run.epochs) == (10_000, 150)
    assert pretrain.model.model == "beit_large_patch16_224_8k_vocab" and pretrain.run.global_batch == 2048

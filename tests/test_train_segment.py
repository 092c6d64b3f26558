"""Segmentation runs of the training loop on a tiny ADE20K-format set: from a pretraining checkpoint at another image
size, exact resume, evaluation rows and saved weights that reload; the base recipe's tiny CPU command line."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_ENV
from safetensors.torch import load_file

from engine.checkpoint import save_pretrained
from engine.config import apply_overrides
from engine.data.demo_segmentation import build_demo_segmentation
from engine.factory import create_model
from engine.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth=2", "--batch_size=4", "--steps=6", "--log_every=1", "--num_workers=0", "--progress=false",
        "--eval_every=3", "--max_eval_images=4", "--save_every=3", "--seed=1", "--warmup_steps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return build_demo_segmentation(tmp_path_factory.mktemp("seg") / "data", num_train=24, num_val=4, image_size=28)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """A random MIM model at 20 px (5 × 5 tokens, shared rel-pos table): loads into the 28 px encoder by resizing."""
    torch.manual_seed(0)
    model = create_model("beit_mini_patch4_28_256_vocab", depth=2, vocab_size=64, img_size=20)
    return save_pretrained(model, tmp_path_factory.mktemp("pretrained") / "weights")


def run(data_dir: Path, output_dir: Path, *extra: str) -> dict:
    sys.path.insert(0, str(ROOT / "recipes"))
    from segment_demo import config

    from engine.train.segment import run_segmentation

    return run_segmentation(apply_overrides(config(), [*TINY, f"--data_path={data_dir}",
                                                       f"--output_dir={output_dir}", *extra]))


@pytest.mark.slow
def test_segmentation_resume_is_exact(data_dir, pretrained_dir, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    summary = run(data_dir, reference, f"--finetune={pretrained_dir}")
    run(data_dir, resumed, f"--finetune={pretrained_dir}", "--max_steps=3")  # stops and saves at step 3
    run(data_dir, resumed, f"--finetune={pretrained_dir}")
    losses = [[r["loss"] for r in read_metrics(out / "metrics.jsonl")] for out in (reference, resumed)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    evals = [read_metrics(out / "eval.jsonl") for out in (reference, resumed)]
    assert [e["step"] for e in evals[0]] == [3, 6] and evals[0] == evals[1]
    assert {"mIoU", "mAcc", "aAcc", "per_class_iou"} <= set(evals[0][-1])
    assert summary["best"]["mIoU"] == max(e["mIoU"] for e in evals[0])
    final = summary["final_dir"]
    config = json.loads((final / "config.json").read_text())["model"]
    from engine.segmentation.model import create_segmenter

    model = create_segmenter(config.pop("name"), **config)
    model.load_state_dict(load_file(final / "model.safetensors"))  # strict: every key round-trips


def base_recipe(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """The base recipe at a tiny size on any ADE20K-format folder, on the CPU (the issue's override set)."""
    return ["recipes/segment_ade20k_base.py", f"--data_path={data_dir}", "--num_classes=11", "--input_size=32",
            "--depth=2", "--batch_size=2", "--global_batch=none", "--max_steps=2", "--eval_every=2",
            "--precision=fp32", "--zero_stage=0", "--device=cpu", "--num_workers=0", f"--output_dir={output_dir}",
            "--img_scale=64,32", "--eval_stride=21", "--max_eval_images=2", "--progress=false",
            "--decode_channels=16", "--aux_channels=8", *extra]


def test_segment_recipe_tiny_cpu_run(data_dir, tmp_path):
    """The issue's override set on the base recipe: a tiny run on any ADE20K-format folder works on a CPU."""
    proc = subprocess.run([sys.executable, *base_recipe(data_dir, tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best mIoU" in proc.stdout and "eval at step 2: mIoU" in proc.stderr
    bad = subprocess.run([sys.executable, "recipes/segment_ade20k_base.py", f"--data_path={tmp_path / 'nope'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "ADE20K-format folder" in bad.stderr


def test_the_large_recipe_counts_the_official_schedule_in_optimizer_updates():
    # upernet_beit_large_24_640_slide_160k_ade20k_ms.py: 8 GPUs × 1 image, update_interval 2, schedule_320k, and
    # warmup_iters 3000, evaluation every 32k: mmcv counts forward iterations, our steps count optimizer updates
    from engine.train import published

    iterations, images_per_iteration, update_interval = 320_000, 8 * 1, 2
    large, base = published.segment("large"), published.segment("base")
    assert large.run.global_batch == images_per_iteration * update_interval == base.run.global_batch
    assert large.run.steps == iterations // update_interval
    assert large.optim.warmup_steps == 3000 // update_interval
    assert large.head.eval_every == 32_000 // update_interval
    assert base.optim.warmup_steps == 1500  # base: 2 images per GPU, one update per iteration


def test_segment_recipe_trains_in_bf16_through_deepspeed(data_dir, tmp_path):
    """DeepSpeed's bf16 casts the parameters, not the buffers: the BatchNorms of the neck and heads computed in the
    parameters' dtype and stopped the first step ("expected scalar type BFloat16 but found Float"); they compute in
    fp32 now, and their running statistics stay fp32."""
    proc = subprocess.run([sys.executable, *base_recipe(data_dir, tmp_path, "--precision=bf16", "--zero_stage=1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert final["backbone.fpn1.1.running_var"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_cpu_ranks_train_and_score_the_validation_images_once(data_dir, tmp_path):
    """Two CPU ranks (BatchNorm per rank: SyncBatchNorm is CUDA-only) train, and their evaluation (each rank its
    own images, one summed confusion matrix; 3 images split 2 + 1) scores what one process scores on the weights."""
    run_dir, alone = tmp_path / "two_ranks", tmp_path / "alone.json"
    result = subprocess.run(["deepspeed", "--num_gpus", "2", *base_recipe(data_dir, run_dir, "--max_eval_images=3",
                                                                          "--global_batch=4")],
                            cwd=ROOT, capture_output=True, text=True, timeout=540, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 per device × 1 accumulation × 2 ranks" in result.stdout + result.stderr
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    evaluation = read_metrics(run_dir / "eval.jsonl")[-1]
    subprocess.run([sys.executable, "recipes/evaluate.py", f"--checkpoint={run_dir / 'final'}",
                    f"--data_path={data_dir}", "--img_scale=64,32", "--eval_stride=21", "--max_images=3",
                    "--device=cpu", "--num_workers=0", f"--output={alone}"],
                   cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV, check=True)
    scored = json.loads(alone.read_text())
    assert scored["images"] == 3
    assert scored["per_class_iou"] == pytest.approx(evaluation["per_class_iou"], abs=1e-9, nan_ok=True)


@pytest.mark.slow
def test_zero3_segmentation_starts_from_the_pretrained_encoder_and_saves_best_and_final(data_dir, pretrained_dir,
                                                                                      tmp_path):
    """At ZeRO-3 the segmenter is built partitioned; the 20 px checkpoint is resized into its gathered encoder."""
    run(data_dir, tmp_path, f"--finetune={pretrained_dir}", "--zero_stage=3")
    final = load_file(tmp_path / "final" / "model.safetensors")["backbone.encoder.patch_embed.proj.weight"]
    pretrained = load_file(pretrained_dir / "model.safetensors")["patch_embed.proj.weight"]
    assert (final - pretrained).norm() < 0.5 * pretrained.norm()
    assert (tmp_path / "best" / "model.safetensors").is_file()

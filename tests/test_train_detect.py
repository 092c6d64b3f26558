"""The detection task in the training loop: the issue's tiny CPU command on a COCO-format folder of a few images,
the published schedule, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SUBPROCESS_ENV, write_tiny_coco

from engine.train.metrics import read_metrics
from engine.train.schedules import step_scheduler

ROOT = Path(__file__).resolve().parents[1]


def test_the_base_recipe_trains_and_evaluates_on_a_tiny_coco_folder(tmp_path):
    write_tiny_coco(tmp_path / "coco")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "recipes/detect_coco_base.py", f"--data_path={tmp_path / 'coco'}", "--input_size=64",
         "--depth=2", "--batch_size=2", "--max_steps=2", "--precision=fp32", "--zero_stage=0", "--device=cpu",
         "--num_workers=0", f"--output_dir={out}", "--progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "box AP" in proc.stdout and "mask AP" in proc.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(np.isfinite(row["loss"]) for row in rows)
    assert {"loss_classifier", "loss_mask", "loss_objectness"} <= set(rows[-1])
    evaluation = read_metrics(out / "eval.jsonl")[-1]
    assert {"box_AP", "box_AP50", "mask_AP", "mask_APs"} <= set(evaluation)
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["model"]["num_classes"] == 3  # from the annotations' categories
    assert saved["preprocessing"]["class_names"] == ["cat", "dog", "toaster"]
    bad = subprocess.run([sys.executable, "recipes/detect_coco_base.py", f"--data_path={tmp_path / 'nope'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "COCO-format folder" in bad.stderr


def test_the_step_schedule_is_detectron2s():
    # ViTDet's mask_rcnn_vitdet_b_100ep.py: 184375 iterations, warm-up 250 from 0.001, ×0.1 at 163889 and 177546
    from engine.train import published

    optim = published.detect("base").optim
    lr = step_scheduler(1e-4, 184375, optim.warmup_steps, optim.lr_steps)
    assert lr[0] == 1e-4 * 0.001 and lr[250] == 1e-4 and lr[163888] == 1e-4
    assert np.isclose(lr[163889], 1e-5) and np.isclose(lr[177546], 1e-6) and np.isclose(lr[-1], 1e-6)
    assert np.isclose(lr[125], 1e-4 * (0.001 * 0.5 + 0.5))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_cpu_ranks_gather_their_detections_into_one_coco_evaluation(tmp_path):
    """Two gloo ranks each detect one validation image; the gathered results score what one process scores on the
    final weights (BatchNorm statistics averaged over the ranks first)."""
    import torch

    from engine.checkpoint import create_model_from_checkpoint
    from engine.data.coco import CocoDetection, DetEvalTransform, collate_detection
    from engine.detection.evaluation import coco_metrics, coco_results

    write_tiny_coco(tmp_path / "coco")
    out = tmp_path / "out"
    result = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "recipes/detect_coco_base.py", f"--data_path={tmp_path / 'coco'}",
         "--input_size=64", "--depth=2", "--batch_size=1", "--max_steps=2", "--precision=fp32", "--zero_stage=1",
         "--device=cpu", "--num_workers=0", f"--output_dir={out}", "--progress=false", "--eval_batch_size=1",
         "--fpn_channels=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=540, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 per device × 1 accumulation × 2 ranks" in result.stdout + result.stderr
    evaluation = read_metrics(out / "eval.jsonl")[-1]
    model = create_model_from_checkpoint(out / "final").eval()
    val = CocoDetection(tmp_path / "coco", "val", training=False, category_ids=[3, 17, 90])
    results = []
    for index in range(len(val)):
        images, metas = collate_detection([DetEvalTransform(64)(*val[index])])
        with torch.no_grad():
            results += coco_results(model(list(images.float() / 255)), metas, val.category_ids)
    alone = coco_metrics(val.coco, results, val.image_ids)
    assert evaluation["detections"] == len(results) > 0  # both ranks' detections reached the evaluation
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert alone[key] == pytest.approx(evaluation[key], abs=1e-9), key

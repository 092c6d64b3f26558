"""Evaluate-only (recipes/evaluate.py): a fine-tuned classifier scores what its training run's evaluation scored; an
official-layout .pth with --model scores the same; a segmenter single-scale and multi-scale + flip; wrong inputs end
in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_finetune_demo

from engine.checkpoint import preprocessing_record, save_pretrained
from engine.config import ConfigError
from engine.factory import create_model
from engine.train.evaluate import EvaluateConfig, run_evaluation, summary_line
from engine.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained_dir) -> Path:
    """A 4-step fine-tuning of a random tiny MIM model: its best/ and the evaluation its run recorded."""
    out = tmp_path_factory.mktemp("finetuned")
    run_finetune_demo(out, "--depth=2", "--batch_size=16", "--epochs=1", "--max_steps=4", "--num_workers=0",
                      "--progress=false", "--eval_batch_size=500", "--log_every=2", f"--finetune={pretrained_dir}")
    return out


def evaluate(tmp_path, **fields) -> dict:
    return run_evaluation(EvaluateConfig(num_workers=0, output=str(tmp_path / "eval.json"), **fields))


def test_a_fine_tuned_checkpoint_scores_what_its_run_scored(finetuned, tmp_path):
    (recorded,) = read_metrics(finetuned / "eval.jsonl")
    result = evaluate(tmp_path, checkpoint=str(finetuned / "best"), data_path="embedded:fashion_mnist")
    assert (result["acc1"], result["acc5"]) == (recorded["acc1"], recorded["acc5"])
    assert result["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text())["acc1"] == recorded["acc1"]
    assert summary_line(result).startswith(f"top-1 {recorded['acc1']:.3f}%")


def test_an_official_layout_pth_with_its_model_name_scores_the_same(finetuned, tmp_path):
    from engine.checkpoint import create_model_from_checkpoint

    model = create_model_from_checkpoint(finetuned / "best")
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    with pytest.raises(ConfigError, match="add --model=NAME"):
        evaluate(tmp_path, checkpoint=str(tmp_path / "official.pth"), data_path="embedded:fashion_mnist")
    result = evaluate(tmp_path, checkpoint=str(tmp_path / "official.pth"), model="beit_mini_patch4_28",
                      data_path="embedded:fashion_mnist", crop_pct=1.0)  # the demo's crop (no record in a .pth)
    own = evaluate(tmp_path, checkpoint=str(finetuned / "best"), data_path="embedded:fashion_mnist")
    assert (result["acc1"], result["acc5"]) == (own["acc1"], own["acc5"])


def test_its_hugging_face_export_with_the_model_name_scores_the_same(finetuned, tmp_path):
    """The transformers folder carries the preprocessing (preprocessor_config.json) and the weights (hub names)."""
    from engine.train.export import export_hf

    export_hf(finetuned / "best", tmp_path / "hf")
    result = evaluate(tmp_path, checkpoint=str(tmp_path / "hf"), model="beit_mini_patch4_28",
                      data_path="embedded:fashion_mnist")
    own = evaluate(tmp_path, checkpoint=str(finetuned / "best"), data_path="embedded:fashion_mnist")
    assert (result["acc1"], result["acc5"]) == (own["acc1"], own["acc5"])


def test_class_names_that_disagree_with_the_data_are_refused(tmp_path):
    model = create_model("beit_mini_patch4_28", depth=1, num_classes=10)
    names = [f"class {i}" for i in range(10)]
    save_pretrained(model, tmp_path / "ckpt", preprocessing_record((0.5,) * 3, (0.5,) * 3, 28, "bicubic", 1.0, names))
    with pytest.raises(ConfigError, match="its classes differ from the checkpoint's"):
        evaluate(tmp_path, checkpoint=str(tmp_path / "ckpt"), data_path="embedded:fashion_mnist")


def test_a_segmenter_single_scale_and_multi_scale_with_flip(tmp_path):
    from engine.data.demo_segmentation import build_demo_segmentation
    from engine.segmentation.model import create_segmenter

    data = build_demo_segmentation(tmp_path / "data", num_train=4, num_val=3, image_size=28)
    torch.manual_seed(0)
    save_pretrained(create_segmenter("beit_mini_patch4_28", num_classes=11, depth=2, aux_channels=8, channels=16),
                    tmp_path / "segmenter")
    single = evaluate(tmp_path, checkpoint=str(tmp_path / "segmenter"), data_path=str(data), eval_stride=28)
    multi = evaluate(tmp_path, checkpoint=str(tmp_path / "segmenter"), data_path=str(data), eval_stride=28,
                     eval_scales=(0.75, 1.0, 1.5), eval_flip=True)
    assert single["images"] == multi["images"] == 3 and 0 <= single["mIoU"] <= 100 and 0 <= multi["mIoU"] <= 100
    assert single["per_class_iou"] != multi["per_class_iou"]  # other predictions, not the same pass twice
    assert "single-scale" in summary_line(single) and "+ flip" in summary_line(multi)


def test_the_command_prints_one_line_for_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "evaluate.py"), f"--checkpoint={tmp_path}/none",
                             "--data_path=embedded:fashion_mnist"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint=")

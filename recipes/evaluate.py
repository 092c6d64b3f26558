"""Evaluate a checkpoint without training: top-1/top-5 of a classifier, mIoU of a segmenter.

    python recipes/evaluate.py --checkpoint=runs/finetune_demo/from_pretrained/best --data_path=embedded:fashion_mnist
    python recipes/evaluate.py --checkpoint=runs/segment_demo/from_pretrained/final --data_path=DIR \
        --eval_scales=0.5,0.75,1.0,1.25,1.5,1.75 --eval_flip=true                       # multi-scale + flip
    python recipes/evaluate.py --checkpoint=beit_large_patch16_224_pt22k_ft22kto1k.pth \
        --model=beit_large_patch16_224 --data_path=/data/imagenet                         # official weights

Prints one summary line and writes the results as JSON (`--output`, default eval.json). The inputs are made as the
checkpoint records (its mean/std, size and crop), else as the official evaluation; see engine/train/evaluate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train.evaluate import EvaluateConfig, run_evaluation, summary_line  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def evaluate(cfg: EvaluateConfig) -> None:
    result = run_evaluation(cfg)
    print(summary_line(result))
    print(f"details: {cfg.output}")


if __name__ == "__main__":
    run_recipe(EvaluateConfig(), evaluate)

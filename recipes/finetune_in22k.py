"""Intermediate fine-tuning on ImageNet-22k (21,841 classes, no evaluation split), the official BEiT schedules:

| preset | global batch | LR | epochs (warm-up) | layer decay | drop path | clip |
|---|---|---|---|---|---|---|
| base (default) | 4096 (256 × 16) | 3e-3 | 90 (5) | 0.65 | 0.2 | 3.0 |
| large | 2048 (64 × 16 × 2) | 2e-3 | 90 (5) | 0.75 | 0.2 | 1.0 |

    deepspeed --num_gpus 8 recipes/finetune_in22k.py --data_path=/data/imagenet22k \
        --finetune=runs/pretrain_in22k_base/pretrained
    ... --preset=large --finetune=runs/pretrain_in22k_large/pretrained

The rest is the pt22k → IN-1k recipe (recipes/finetune_base.py: weight decay 0.05, mixup 0.8, cutmix 1.0, label
smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, cosine to 1e-6), which the source of the table
(../shared/reference/beit-official.md, section 5) leaves unstated. There is no evaluation during training
(`--disable_eval_during_finetuning=true`, the official flag): the run writes `final/`, no `best/`; fine-tune that on
ImageNet-1k next (recipes/finetune_base.py with the pt22k_ft22k settings).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.finetune import print_outcome, run_finetuning  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config(preset: str = "base"):
    return published.finetune(preset, "in22k")


PRESETS = {size: (lambda cfg, size=size: config(size)) for size in published.SIZES}

if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_finetuning, presets=PRESETS, default_preset="base"))

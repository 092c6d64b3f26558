"""BEiT-Large fine-tuning on ImageNet-1k, the official recipe (unilm beit README, BEiT-L pt22k → IN-1k): the Base
recipe (recipes/finetune_base.py, same flags and --preset) with the Large model, absolute LR 1e-3, layer decay 0.75,
50 epochs with 5 warmup, drop path 0.2, global batch 1024 (64 per device).

    deepspeed --num_gpus 8 recipes/finetune_large.py --data_path=/data/imagenet \
        --finetune=runs/pretrain_large/pretrained
    ... --model=beit_large_patch16_384 --input_size=384      # 384 px
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.finetune import print_outcome, run_finetuning  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402

PRESETS = {"imagenet": lambda cfg: cfg, "cifar100": lambda cfg: published.finetune("large", "cifar100")}


def config():
    return published.finetune("large")


if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_finetuning, presets=PRESETS))

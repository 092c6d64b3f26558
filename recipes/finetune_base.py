"""BEiT-Base fine-tuning on ImageNet-1k, the official recipe (unilm beit README, BEiT-B pt22k → IN-1k).

    deepspeed --num_gpus 8 recipes/finetune_base.py --data_path=/data/imagenet --finetune=runs/pretrain_base/pretrained
    # 384 px (rel-pos tables resized by engine.checkpoint.load_checkpoint):
    ... --model=beit_base_patch16_384 --input_size=384
    # CIFAR-100-style setting (paper appendix, unverified: batch 512, 150 epochs, 20 warmup, layer decay 0.65;
    # the LR is our choice: the IN-1k 4e-3 scaled linearly to batch 512):
    ... --preset=cifar100 --data_path=/data/cifar100_folders

Global batch 1024, absolute LR 4e-3 (the README's value, not rescaled), layer decay 0.65, 100 epochs with 20 warmup,
cosine to 1e-6, drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, wd 0.05, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, bf16 on GPUs (`--precision=auto`) with ZeRO stage 1 (the official run used DeepSpeed fp16
without ZeRO).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.finetune import print_outcome, run_finetuning  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402

PRESETS = {"imagenet": lambda cfg: cfg, "cifar100": lambda cfg: published.finetune("base", "cifar100")}


def config():
    return published.finetune("base")


if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_finetuning, presets=PRESETS))

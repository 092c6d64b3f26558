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

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import config_errors_exit, parse_overrides, take_preset  # noqa: E402
from engine.train.finetune import run_finetuning  # noqa: E402
from engine.train.settings import FinetuneConfig, FinetuneData, ModelSettings, OptimSettings, RunSettings  # noqa: E402

PRESETS = ("imagenet", "cifar100")


def config() -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelSettings(model="beit_base_patch16_224", input_size=224, drop_path=0.1,
                            attn_impl="triton" if torch.cuda.is_available() else "sdpa"),
        data=FinetuneData(data_path="", finetune="", mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25,
                          auto_augment="rand-m9-mstd0.5-inc1", imagenet_mean_std=True),
        optim=OptimSettings(lr=4e-3, min_lr=1e-6, warmup_epochs=20, weight_decay=0.05, clip_grad=0.0,
                            layer_decay=0.65),
        run=RunSettings(output_dir="runs/finetune_base", epochs=100, batch_size=128, global_batch=1024,
                        precision="auto", zero_stage=1, num_workers=10, save_every=2000, log_every=50),
    )


def cifar100(cfg: FinetuneConfig) -> FinetuneConfig:
    cfg.run.global_batch, cfg.run.epochs, cfg.optim.warmup_epochs = 512, 150, 20
    cfg.optim.lr, cfg.optim.layer_decay = 2e-3, 0.65
    cfg.run.output_dir = cfg.run.output_dir + "_cifar100"
    return cfg


def main(cfg: FinetuneConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    preset, argv = take_preset(sys.argv[1:], PRESETS)
    if preset == "cifar100":
        cfg = cifar100(cfg)
    cfg = parse_overrides(cfg, argv)
    with config_errors_exit():
        summary = run_finetuning(cfg)
    if summary.get("best"):
        print(f"best top-1 {summary['best']['acc1']:.2f}% at step {summary['best'].get('step')}")
    elif summary.get("final_dir"):
        print(f"no evaluation ran; final weights in {summary['final_dir']}")


if __name__ == "__main__":
    main(config())

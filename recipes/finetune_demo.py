"""Fine-tunes the pretraining demo's checkpoint on the labelled embedded Fashion-MNIST images (6000 train / 1000
test, 10 classes) and trains the same model from scratch with the same recipe, then prints both top-1 accuracies.

    python recipes/pretrain_demo.py        # first: writes runs/pretrain_demo/pretrained
    python recipes/finetune_demo.py [--key=value ...]

Model: beit_mini_patch4_28 (the pretraining demo's encoder), per-layer rel-pos tables expanded from the shared one by
engine.checkpoint.load_checkpoint. Light augmentation for 28 px grey images and a few epochs: horizontal flip only
(no random-resized crop, RandAugment, mixup/cutmix, erasing), label smoothing 0.1, no drop path.
LR: the absolute `--lr` (1e-3 at global batch 64, 0.3 warm-up epochs) with layer decay 0.9; 3 epochs per arm.
Measured from scratch on these 6000 images, 3 epochs: 57.3% top-1 with these settings; 47.6% with the earlier
recipe's lr 2e-3, 0.5 warm-up epochs and random-resized crops of >= 50% of the area (the scratch arm of
`--lr=2e-3 --warmup_epochs=0.5 --min_crop_scale=0.5`).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train.demos import finetune_config  # noqa: E402
from engine.train.finetune import run_finetuning  # noqa: E402
from engine.train.recipe import run_arms, run_recipe  # noqa: E402

# Training images per second of beit_mini_patch4_28 at batch 64 on this project's 2-core CPU machine (img_per_s in
# the metrics.jsonl of the seed-0 fine-tuning runs of recipes/fashion_mnist_evidence.py: medians 140 and 129).
IMAGES_PER_SECOND_2_CORES = 130


def config():
    return finetune_config()


def expected_minutes(cfg, num_train: int = 6000) -> float:
    """Both arms' training images at the measured rate, plus evaluation and start-up (about 30 s per arm)."""
    return (2 * cfg.run.epochs * num_train / IMAGES_PER_SECOND_2_CORES + 60) / 60


def demo(cfg) -> None:
    started = time.time()
    print(f"fine-tuning from {cfg.data.finetune} and from scratch, {cfg.run.epochs} epochs each: expect about "
          f"{expected_minutes(cfg):.0f} minutes on an idle 2-core CPU")
    results = run_arms(cfg, run_finetuning)
    print(f"\n=== fine-tuning demo finished in {time.time() - started:.0f} s ===")
    for name, summary in results.items():
        last = summary["evals"][-1]
        print(f"{name:>10}: top-1 {last['acc1']:.2f}% (best {summary['best']['acc1']:.2f}%), top-5 "
              f"{last['acc5']:.2f}% after {summary['step']} steps → {summary['best_dir']}")


if __name__ == "__main__":
    run_recipe(config(), demo)

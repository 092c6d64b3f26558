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

import copy
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import config_errors_exit, parse_overrides  # noqa: E402
from engine.train.finetune import run_finetuning  # noqa: E402
from engine.train.settings import (  # noqa: E402
    FinetuneConfig,
    FinetuneData,
    FinetuneExtras,
    ModelSettings,
    OptimSettings,
    RunSettings,
)

# Training images per second of beit_mini_patch4_28 at batch 64 on this project's 2-core CPU machine (img_per_s in
# the metrics.jsonl of the seed-0 fine-tuning runs of recipes/fashion_mnist_evidence.py: medians 140 and 129).
IMAGES_PER_SECOND_2_CORES = 130


def config() -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelSettings(model="beit_mini_patch4_28", input_size=28, drop_path=0.0),
        data=FinetuneData(data_path="embedded:fashion_mnist", finetune="runs/pretrain_demo/pretrained", crop_pct=1.0,
                          min_crop_scale=1.0, auto_augment="", color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0,
                          smoothing=0.1, imagenet_mean_std=False),
        optim=OptimSettings(lr=1e-3, min_lr=1e-6, warmup_epochs=0.3, weight_decay=0.05, clip_grad=3.0,
                            layer_decay=0.9),  # 0.75 starves the lightly pretrained lower blocks at this scale
        run=RunSettings(output_dir="runs/finetune_demo", epochs=3, batch_size=64, precision="fp32", zero_stage=0,
                        num_workers=1, save_every=0, log_every=10),
        extras=FinetuneExtras(eval_every=1),
    )


def expected_minutes(cfg: FinetuneConfig, num_train: int = 6000) -> float:
    """Both arms' training images at the measured rate, plus evaluation and start-up (about 30 s per arm)."""
    return (2 * cfg.run.epochs * num_train / IMAGES_PER_SECOND_2_CORES + 60) / 60


ARMS = {"pretrained": "from_pretrained", "scratch": "from_scratch"}  # arm → its subfolder of --output_dir


def run_arms(cfg, run) -> dict:
    """A demo's two arms with `run(cfg)`: from `cfg.data.finetune`, then the same from scratch, each in its folder of
    ARMS under `cfg.run.output_dir`. The first stop signal stops the whole demo (a rerun resumes the stopped arm,
    then runs the other)."""
    results = {}
    for name, folder in ARMS.items():
        arm = copy.deepcopy(cfg)
        arm.data.finetune = cfg.data.finetune if name == "pretrained" else ""
        arm.run.output_dir = str(Path(cfg.run.output_dir) / folder)
        with config_errors_exit():
            results[name] = run(arm)
        if results[name]["stopped_by"]:
            raise SystemExit(f"stopped during the {name} arm; run the same command again to resume it")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    cfg = parse_overrides(config(), sys.argv[1:])
    print(f"fine-tuning from {cfg.data.finetune} and from scratch, {cfg.run.epochs} epochs each: expect about "
          f"{expected_minutes(cfg):.0f} minutes on an idle 2-core CPU")
    results = run_arms(cfg, run_finetuning)
    print(f"\n=== fine-tuning demo finished in {time.time() - started:.0f} s ===")
    for name, summary in results.items():
        last = summary["evals"][-1]
        print(f"{name:>10}: top-1 {last['acc1']:.2f}% (best {summary['best']['acc1']:.2f}%), top-5 "
              f"{last['acc5']:.2f}% after {summary['step']} steps → {summary['best_dir']}")

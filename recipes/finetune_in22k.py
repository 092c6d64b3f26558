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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_base import config as base_config  # noqa: E402
from finetune_base import main  # noqa: E402

from engine.config import take_preset  # noqa: E402

# preset: (model, per-device batch, global batch, lr, layer decay, clip)
PRESETS = {"base": ("beit_base_patch16_224", 256, 4096, 3e-3, 0.65, 3.0),
           "large": ("beit_large_patch16_224", 64, 2048, 2e-3, 0.75, 1.0)}


def config(preset: str = "base"):
    model, batch, global_batch, lr, layer_decay, clip = PRESETS[preset]
    cfg = base_config()
    cfg.model.model, cfg.model.drop_path = model, 0.2
    cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.clip_grad, cfg.optim.warmup_epochs = lr, layer_decay, clip, 5
    cfg.run.batch_size, cfg.run.global_batch, cfg.run.epochs = batch, global_batch, 90
    cfg.run.output_dir = f"runs/finetune_in22k_{preset}"
    cfg.extras.disable_eval_during_finetuning = True
    return cfg


if __name__ == "__main__":
    preset, sys.argv[1:] = take_preset(sys.argv[1:], PRESETS, default="base")
    main(config(preset))

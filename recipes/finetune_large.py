"""BEiT-Large fine-tuning on ImageNet-1k, the official recipe (unilm beit README, BEiT-L pt22k → IN-1k): the Base
recipe (recipes/finetune_base.py, same flags and --preset) with the Large model, absolute LR 1e-3, layer decay 0.75,
50 epochs with 5 warmup, drop path 0.2, global batch 1024 (64 per device).

    deepspeed --num_gpus 8 recipes/finetune_large.py --data_path=/data/imagenet \
        --finetune=runs/pretrain_large/pretrained
    ... --model=beit_large_patch16_384 --input_size=384      # 384 px
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_base import config as base_config  # noqa: E402
from finetune_base import main  # noqa: E402


def config():
    cfg = base_config()
    cfg.model.model, cfg.model.drop_path = "beit_large_patch16_224", 0.2
    cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.warmup_epochs = 1e-3, 0.75, 5
    cfg.run.epochs, cfg.run.batch_size, cfg.run.output_dir = 50, 64, "runs/finetune_large"
    return cfg


if __name__ == "__main__":
    main(config())

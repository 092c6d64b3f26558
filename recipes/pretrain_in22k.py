"""BEiT pretraining on ImageNet-22k, the official schedule (unilm beit README command for IN-22k): the IN-1k recipe
(recipes/pretrain_base.py: global batch 2048, LR 1.5e-3, clip 3.0, drop path 0.1, 75 masked patches) with 10,000
warm-up steps and 150 epochs, about 1.04 M steps on the 14.2 M images.

    deepspeed --num_gpus 8 recipes/pretrain_in22k.py --data_path=/data/imagenet22k --tokenizer=/weights/dall_e_tok
    ... --preset=large        # BEiT-L: the Large model, layer scale 1e-5 (recipes/pretrain_large.py)

The images are listed once into the folder's index, never opened at start-up (engine/data/folder_index.py);
class folders or a flat folder both work (pretraining ignores labels).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_base import config as base_config  # noqa: E402
from pretrain_base import main  # noqa: E402
from pretrain_large import config as large_config  # noqa: E402

from engine.config import take_preset  # noqa: E402

PRESETS = {"base": base_config, "large": large_config}


def config(preset: str = "base"):
    cfg = PRESETS[preset]()
    cfg.optim.warmup_steps = 10_000
    cfg.run.epochs = 150
    cfg.run.output_dir = f"runs/pretrain_in22k_{preset}"
    return cfg


if __name__ == "__main__":
    preset, sys.argv[1:] = take_preset(sys.argv[1:], PRESETS, default="base")
    main(config(preset))

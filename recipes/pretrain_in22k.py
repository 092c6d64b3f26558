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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config(preset: str = "base"):
    return published.pretrain(preset, "in22k")


PRESETS = {size: (lambda cfg, size=size: config(size)) for size in published.SIZES}

if __name__ == "__main__":
    run_recipe(config(), run_pretraining, presets=PRESETS, default_preset="base")

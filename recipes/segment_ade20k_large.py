"""BEiT-Large semantic segmentation on ADE20K with UperNet at 640 px, the official Large settings: the Base recipe
(recipes/segment_ade20k_base.py) with BEiT-L (blocks 7/11/15/23, UPerHead 1024 channels), layer scale 1e-6, drop
path 0.2, layer decay 0.95 at lr 2e-5, crop 640 with stride 426 and img_scale 2560 × 640, 1500 warm-up steps (the
official 3000 warm-up iterations with 2 accumulation steps each: steps here are optimizer updates).

    deepspeed --num_gpus 8 recipes/segment_ade20k_large.py --data_path=/data/ADEChallengeData2016 \\
        --finetune=/weights/beit_large_finetuned
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402
from engine.train.segment import print_outcome, run_segmentation  # noqa: E402


def config():
    return published.segment("large")


if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_segmentation))

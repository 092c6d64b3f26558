"""BEiT-Large Mask R-CNN on COCO 2017: the Base recipe (recipes/detect_coco_base.py) with BEiT-L (blocks
7/11/15/23), layer scale 1e-5, drop path 0.4 and layer decay 0.8 (detectron2's `mask_rcnn_vitdet_l_100ep.py`).

    deepspeed --num_gpus 8 recipes/detect_coco_large.py --data_path=/data/coco --finetune=runs/pretrain_large/pretrained
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.detect import print_outcome, run_detection  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config():
    return published.detect("large")


if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_detection))

"""BEiT-Base Mask R-CNN on COCO 2017 (box and mask AP), the ViTDet recipe on torchvision's detector
(`engine.train.published.detect`: detectron2's `mask_rcnn_vitdet_b_100ep.py`; Li et al. 2021 report 49.8 box AP /
44.4 mask AP from BEiT-B).

    deepspeed --num_gpus 8 recipes/detect_coco_base.py --data_path=/data/coco \\
        --finetune=runs/pretrain_base/pretrained                       # from self-supervised pretraining
    python recipes/detect_coco_base.py --data_path=ANY_COCO_FORMAT_DIR --input_size=64 --depth=2 --batch_size=2 \\
        --max_steps=2 --precision=fp32 --zero_stage=0 --device=cpu --num_workers=0 --output_dir=OUT   # tiny, CPU

Model: BEiT-B (per-layer relative position bias, layer scale 0.1, drop path 0.1) at 1024², blocks 3/5/7/11 through
BEiT's multi-level neck, torchvision's FPN (256 channels, p2-p6), RPN and RoI heads; the classes are the training
annotations' categories. Data: large-scale jitter (0.1-2.0) and flips, padded to 1024²; evaluation resizes the long
side to 1024. Optimisation: AdamW (wd 0.1), layer decay 0.7 at lr 1e-4, 250 warm-up iterations, 184375 iterations
of 64 images (8 per GPU on 8 GPUs; on other counts `--batch_size=B --global_batch=64` accumulates to 64), LR ×0.1
at 88.9% and 96.3%. ZeRO stages 0-2
on several ranks (evaluation runs a different number of batches per rank); bf16 on GPUs (`--precision=auto`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.detect import print_outcome, run_detection  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config():
    return published.detect("base")


if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_detection))

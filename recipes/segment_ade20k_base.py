"""BEiT-Base semantic segmentation on ADE20K with UperNet, the official settings (unilm beit/semantic_segmentation,
`upernet_beit_base_12_512_slide_160k_ade20k_pt2ft.py` and its 640 px variant).

    deepspeed --num_gpus 8 recipes/segment_ade20k_base.py --data_path=/data/ADEChallengeData2016 \\
        --finetune=runs/pretrain_base/pretrained                        # from self-supervised pretraining
    deepspeed --num_gpus 8 recipes/segment_ade20k_base.py --preset=in1k_finetuned --data_path=... \\
        --finetune=/weights/beit_base_in1k_finetuned                    # from an ImageNet-fine-tuned BEiT-B
    python recipes/segment_ade20k_base.py --data_path=ANY_ADE20K_FORMAT_DIR --num_classes=K --input_size=64 \\
        --depth=2 --batch_size=2 --global_batch=none --max_steps=4 --eval_every=2 --eval_stride=32 --device=cpu \\
        --num_workers=0                                                   # a tiny CPU run

Model: BEiT-B (per-layer relative position bias, layer scale 0.1, drop path 0.1) at a 512 crop, blocks 3/5/7/11
through the official neck (strides 4/8/16/32), UPerHead (768 channels, pool scales 1/2/3/6) and an auxiliary FCN
head (256 channels on the stride-16 level, loss weight 0.4); cross-entropy with label 0 ignored.
Optimisation: AdamW (wd 0.05), layer decay 0.65 at lr 7e-4 from pretraining (preset in1k_finetuned: 0.9 at 3e-5),
poly schedule (power 1) after 1500 linear warm-up iterations, 160k iterations of 16 images (2 per GPU on 8 GPUs;
`--global_batch=16` keeps that on any number of ranks). Evaluation every 16k iterations and at the end by sliding
window (crop 512, stride 341); `--input_size=640 --eval_stride=426 --img_scale=2560,640` is the 640 px recipe;
`--eval_scales=0.5,0.75,1.0,1.25,1.5,1.75 --eval_flip=true` the multi-scale + flip test.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402
from engine.train.segment import print_outcome, run_segmentation  # noqa: E402

PRESETS = {"in1k_finetuned": lambda cfg: published.segment("base", start="in1k_finetuned")}


def config():
    return published.segment("base")


if __name__ == "__main__":
    print_outcome(run_recipe(config(), run_segmentation, presets=PRESETS))

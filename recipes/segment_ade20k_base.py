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

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import config_errors_exit, exit_with_error, parse_overrides  # noqa: E402
from engine.train.segment import run_segmentation  # noqa: E402
from engine.train.settings import (  # noqa: E402
    ModelSettings,
    OptimSettings,
    RunSettings,
    SegmentationConfig,
    SegmentationData,
    SegmentationHead,
)


def config() -> SegmentationConfig:
    return SegmentationConfig(
        model=ModelSettings(model="beit_base_patch16_224", input_size=512, drop_path=0.1, layer_scale_init_value=0.1,
                            attn_impl="triton" if torch.cuda.is_available() else "sdpa"),
        data=SegmentationData(num_classes=150, img_scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                              eval_stride=341),
        head=SegmentationHead(decode_channels=None, aux_channels=256, aux_weight=0.4, eval_every=16000),
        optim=OptimSettings(lr=7e-4, min_lr=0.0, warmup_steps=1500, weight_decay=0.05, layer_decay=0.65,
                            lr_schedule="poly", poly_power=1.0, clip_grad=0.0),
        run=RunSettings(output_dir="runs/segment_ade20k_base", steps=160000, batch_size=2, global_batch=16,
                        precision="auto", zero_stage=1, num_workers=4, save_every=4000, log_every=50),
    )


def in1k_finetuned(cfg: SegmentationConfig) -> SegmentationConfig:
    """From a BEiT-B already fine-tuned on ImageNet-1k (intermediate fine-tuning): layer decay 0.9 at lr 3e-5."""
    cfg.optim.lr, cfg.optim.layer_decay = 3e-5, 0.9
    cfg.run.output_dir += "_in1k_finetuned"
    return cfg


PRESETS = {"in1k_finetuned": in1k_finetuned}


def main(cfg: SegmentationConfig, presets: dict = PRESETS) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:]
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")]
    if chosen and chosen[-1] not in presets:
        exit_with_error(f"--preset={chosen[-1]}: expected one of {', '.join(presets) or 'none for this recipe'}")
    if chosen:
        cfg = presets[chosen[-1]](cfg)
    cfg = parse_overrides(cfg, [a for a in argv if not a.startswith("--preset=")])
    with config_errors_exit():
        summary = run_segmentation(cfg)
    if summary.get("best"):
        print(f"best mIoU {summary['best']['mIoU']:.2f}% at step {summary['best'].get('step')}; "
              f"last mIoU {summary['evals'][-1]['mIoU']:.2f}%" if summary.get("evals") else "")
    return summary


if __name__ == "__main__":
    main(config())

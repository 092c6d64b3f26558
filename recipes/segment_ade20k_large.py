"""BEiT-Large semantic segmentation on ADE20K with UperNet at 640 px, the official Large settings: the Base recipe
(recipes/segment_ade20k_base.py) with BEiT-L (blocks 7/11/15/23, UPerHead 1024 channels), layer scale 1e-6, drop
path 0.2, layer decay 0.95 at lr 2e-5, 3000 warm-up iterations, crop 640 with stride 426 and img_scale 2560 × 640.

    deepspeed --num_gpus 8 recipes/segment_ade20k_large.py --data_path=/data/ADEChallengeData2016 \\
        --finetune=/weights/beit_large_finetuned
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segment_ade20k_base import config as base_config  # noqa: E402
from segment_ade20k_base import main  # noqa: E402


def config():
    cfg = base_config()
    cfg.model.model, cfg.model.input_size = "beit_large_patch16_224", 640
    cfg.model.layer_scale_init_value, cfg.model.drop_path = 1e-6, 0.2
    cfg.data.img_scale, cfg.data.eval_stride = (2560, 640), 426
    cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.warmup_steps = 2e-5, 0.95, 3000
    cfg.run.output_dir = "runs/segment_ade20k_large"
    return cfg


if __name__ == "__main__":
    main(config(), presets={})

"""BEiT-Large pretraining: the Base recipe (recipes/pretrain_base.py) with the Large model and layer scale 1e-5,
as in the unilm beit README.

    deepspeed --num_gpus 8 recipes/pretrain_large.py --data_path=/data/imagenet/train --tokenizer=/weights/dall_e_tok
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_base import config as base_config  # noqa: E402
from pretrain_base import main  # noqa: E402


def config():
    cfg = base_config()
    cfg.model.model = "beit_large_patch16_224_8k_vocab"
    cfg.model.layer_scale_init_value = 1e-5
    cfg.run.output_dir = "runs/pretrain_large"
    return cfg


if __name__ == "__main__":
    main(config())

"""BEiT-Large pretraining: the Base recipe (recipes/pretrain_base.py) with the Large model and layer scale 1e-5,
as in the unilm beit README.

    deepspeed --num_gpus 8 recipes/pretrain_large.py --data_path=/data/imagenet/train --tokenizer=/weights/dall_e_tok
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config():
    return published.pretrain("large")


if __name__ == "__main__":
    run_recipe(config(), run_pretraining)

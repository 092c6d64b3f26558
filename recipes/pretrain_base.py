"""BEiT-Base pretraining on ImageNet-1k with the paper's settings (unilm beit README command for IN-1k).

    deepspeed --num_gpus 8 recipes/pretrain_base.py --data_path=/data/imagenet/train --tokenizer=/weights/dall_e_tok

Global batch 2048 (`--global_batch`; grad_accum is derived from it, the per-device `--batch_size` and the number of
ranks), absolute LR 1.5e-3 as passed by the README command (not rescaled with the batch), 10 warmup epochs then cosine
to 1e-5, 800 epochs (500k steps), AdamW wd 0.05, clip 3.0, drop path 0.1, layer scale 0.1, 75 of 196 patches masked
(blocks of >= 16), shared relative position bias, bf16 on GPUs (`--precision=auto`). `--tokenizer` is the DALL-E dVAE
encoder converted with `python -m engine.tokenizer.convert` (no weights ship with this repo).

ZeRO stage 1: the replicated memory that matters for an 86M/304M-parameter ViT is the optimizer state (fp32 master
weights + Adam moments, 12 bytes/param); stage 1 shards it at the communication cost of plain data parallelism
(reduce-scatter + all-gather instead of one all-reduce), while stages 2/3 add per-bucket gradient/parameter traffic
that these model sizes do not need on 80 GB GPUs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train import published  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config():
    return published.pretrain("base")


if __name__ == "__main__":
    run_recipe(config(), run_pretraining)

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

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import config_errors_exit, exit_with_error, parse_overrides  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.settings import (  # noqa: E402
    OptimSettings,
    PretrainConfig,
    PretrainData,
    PretrainModelSettings,
    RunSettings,
)


def config() -> PretrainConfig:
    return PretrainConfig(
        model=PretrainModelSettings(model="beit_base_patch16_224_8k_vocab", input_size=224, drop_path=0.1,
                            layer_scale_init_value=0.1, use_shared_rel_pos_bias=True,
                            attn_impl="triton" if torch.cuda.is_available() else "sdpa",
                            mlm_loss="auto"),
        data=PretrainData(data_path="", tokenizer="", second_input_size=112, num_mask_patches=75,
                          min_mask_patches=16, imagenet_mean_std=True),
        optim=OptimSettings(lr=1.5e-3, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, clip_grad=3.0),
        run=RunSettings(output_dir="runs/pretrain_base", epochs=800, batch_size=128, global_batch=2048,
                        precision="auto", zero_stage=1, num_workers=10, save_every=5000, log_every=50),
    )


def main(cfg: PretrainConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    cfg = parse_overrides(cfg, sys.argv[1:])
    if not cfg.data.tokenizer:
        exit_with_error(f"--tokenizer=DIR is required (see the docstring of {Path(sys.argv[0]).name})")
    with config_errors_exit():
        run_pretraining(cfg)


if __name__ == "__main__":
    main(config())

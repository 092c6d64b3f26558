"""AdamW over the parameter groups of engine/param_groups.py: DeepSpeed's fused or CPU-offload Adam, or torch's."""

import logging

import torch

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def build_optimizer(groups: list[dict], lr: float, device_type: str, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8): DeepSpeed FusedAdam on CUDA, DeepSpeedCPUAdam under ZeRO CPU offload,
    torch AdamW (fused where the device supports it) otherwise. `param_names` is dropped from the groups."""
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(clean, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, adamw_mode=True)
    elif device_type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(clean, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, adam_w_mode=True)
    else:
        optimizer = torch.optim.AdamW(clean, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    logger.info("optimizer: %s (%d groups)", type(optimizer).__name__, len(clean))
    return optimizer

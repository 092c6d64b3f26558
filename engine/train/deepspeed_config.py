"""The DeepSpeed JSON built from a recipe's `RunSettings` and `OptimSettings`.

The optimizer and the LR/WD schedule stay on our side (client optimizer, values written into the param groups every
step), so the JSON has no "optimizer"/"scheduler" sections. Clipping is DeepSpeed's own "gradient_clipping", which
DeepSpeed applies in every mode (fp32 stage 0 through `clip_fp32_gradients`, the ZeRO and mixed-precision optimizers
after unscaling); tests/test_train_deepspeed.py checks that it really changes the update.
"""

from torch import nn

from engine.sharded import full_numel
from engine.train.settings import OptimSettings, RunSettings


def bucket_elements(module: nn.Module) -> int:
    """The most parameters DeepSpeed should move at once for `module`: its largest repeated unit (an item of a
    `ModuleList`: a transformer block) or its largest layer, whichever is bigger."""
    def numel(unit: nn.Module, recurse: bool) -> int:
        return sum(full_numel(p) for p in unit.parameters(recurse=recurse))

    units = [numel(item, True) for m in module.modules() if isinstance(m, nn.ModuleList) for item in m]
    return max([numel(m, False) for m in module.modules()] + units)


def build_deepspeed_config(run: RunSettings, optim: OptimSettings, world_size: int,
                           bucket: int | None = None) -> dict:
    """DeepSpeed config dict: batch sizes, ZeRO stage (+ optional CPU offload), precision, clipping.

    `bucket` (`bucket_elements(model)`) sizes ZeRO's buffers from the model instead of DeepSpeed's defaults (5e8
    elements per gradient bucket, 1e9 live parameters: sized for billion-parameter models, and a 2 GB fp32 bucket
    holds all of BEiT-L's gradients a second time): gradients are reduced and parameters gathered one block at a time,
    ZeRO-3 prefetches one block ahead and keeps at most three gathered."""
    zero: dict = {"stage": run.zero_stage}
    if run.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if bucket is not None and run.zero_stage >= 1:
        zero["reduce_bucket_size"] = bucket
        if run.zero_stage < 3:
            zero["allgather_bucket_size"] = bucket
        else:
            zero.update(stage3_prefetch_bucket_size=bucket, stage3_max_live_parameters=3 * bucket,
                        stage3_max_reuse_distance=bucket)
    config = {
        "train_batch_size": run.batch_size * run.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": run.batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        "gradient_clipping": float(optim.clip_grad),
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # our own metrics logger reports progress
        "wall_clock_breakdown": False,
    }
    if run.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif run.precision == "fp16":
        # Dynamic loss scaling as in the official fine-tuning config: start at 2**7, grow every 128 clean steps.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 7, "loss_scale_window": 128,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config

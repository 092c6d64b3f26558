"""The DeepSpeed JSON built from a recipe's `RunSettings` and `OptimSettings`.

The optimizer and the LR/WD schedule stay on our side (client optimizer, values written into the param groups every
step), so the JSON has no "optimizer"/"scheduler" sections. Clipping is DeepSpeed's own "gradient_clipping", which
DeepSpeed applies in every mode (fp32 stage 0 through `clip_fp32_gradients`, the ZeRO and mixed-precision optimizers
after unscaling); tests/test_train_deepspeed.py checks that it really changes the update.
"""

from engine.train.settings import OptimSettings, RunSettings


def build_deepspeed_config(run: RunSettings, optim: OptimSettings, world_size: int) -> dict:
    """DeepSpeed config dict: batch sizes, ZeRO stage (+ optional CPU offload), precision, clipping."""
    if run.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={run.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2 or 3")
    if run.offload and run.zero_stage == 0:
        raise ValueError("offload=true needs zero_stage >= 1 (ZeRO-Offload keeps the partitioned optimizer on the CPU)")
    if run.batch_size < 1 or run.grad_accum < 1:
        raise ValueError(f"batch_size ({run.batch_size}) and grad_accum ({run.grad_accum}) must be >= 1")
    zero: dict = {"stage": run.zero_stage}
    if run.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
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

"""The one step that fills in what a checked config leaves open: `resolve_config(cfg, world_size)`.

`cfg.validate()` (engine/train/validation.py) only checks. `train()` calls `resolve_config` once, after joining the
process group and taking the run's lock, before the task is built, and the run's `config.json`
records the values it wrote:
- `run.device`: auto → cuda when a GPU is visible, else cpu;
- `run.precision`: auto → bf16 on a GPU that runs it (fp16 on older ones) and on a CPU with native bf16, else fp32;
- `model.mlm_loss` (pretraining): auto → the fused kernel on CUDA, else the PyTorch reference (Triton's interpreter
  is for debugging the kernels, not a reason to pick them);
- `run.grad_accum`: global_batch / (batch_size × ranks) when `run.global_batch` is set (validation checked that it
  divides);
- `data.imagenet_mean_std` (fine-tuning, segmentation): None → the normalisation the `--finetune` checkpoint records
  (engine.checkpoint.read_preprocessing), else 0.5/0.5 (the official default).

A config class may define `prepare()`, run first: inputs that a recipe finds or makes before its run (the demo's
cached tokenizer, engine/train/demos.py).
"""

import logging
from pathlib import Path

import torch

from engine.device import resolve_device

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 Linux; elsewhere assume not (the safe choice: fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolved_precision(precision: str, device: str) -> str:
    """`precision` with auto replaced by what `device` (cuda or cpu) runs fastest."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_config(cfg, world_size: int) -> None:
    """Writes the concrete device, precision, masked-token loss and gradient accumulation into `cfg` (in place)."""
    if hasattr(cfg, "prepare"):
        cfg.prepare()
    run = cfg.run
    run.device = resolve_device(run.device)
    run.precision = resolved_precision(run.precision, run.device)
    if getattr(cfg.model, "mlm_loss", None) == "auto":
        cfg.model.mlm_loss = "fused" if run.device == "cuda" else "reference"
        logger.info("mlm_loss=auto → %s (device %s)", cfg.model.mlm_loss, run.device)
    if run.global_batch is not None:
        run.grad_accum = run.global_batch // (run.batch_size * world_size)
    if getattr(cfg.data, "imagenet_mean_std", False) is None:
        cfg.data.imagenet_mean_std = checkpoint_uses_imagenet_mean_std(cfg.data.finetune)


def checkpoint_uses_imagenet_mean_std(checkpoint: str) -> bool:
    """Whether `checkpoint` (a --finetune path, or "") was trained on ImageNet-normalised inputs, by the
    preprocessing saved with it; False (0.5/0.5, the official default) when it records none."""
    from engine.checkpoint import read_preprocessing
    from engine.data.transforms import IMAGENET_DEFAULT_MEAN

    record = read_preprocessing(checkpoint) if checkpoint and Path(checkpoint).exists() else None
    imagenet = record is not None and all(abs(a - b) < 1e-3 for a, b in zip(record["mean"], IMAGENET_DEFAULT_MEAN))
    logger.info("imagenet_mean_std=None → %s (%s)", imagenet,
                f"the preprocessing saved with {checkpoint}" if record else "no preprocessing saved with the weights: "
                "0.5/0.5, the official default")
    return imagenet

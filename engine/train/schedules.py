"""Per-step schedules: the official BEiT `cosine_scheduler` (linear warmup from `start_warmup_value`, then cosine),
mmseg's `poly` LR policy with linear warm-up (the official BEiT segmentation runs) and detectron2's multi-step
schedule with linear warm-up (ViTDet's Mask R-CNN runs)."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.train.settings import OptimSettings


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
    warmup_steps: int = -1,
) -> np.ndarray:
    """Value for every optimizer step: `[epochs * niter_per_ep]` float64.

    Warmup is linear from `start_warmup_value` to `base_value` over `warmup_steps` steps (or `warmup_epochs` epochs
    when `warmup_steps` < 0); the remaining steps follow `final_value + (base - final)(1 + cos(pi i / n)) / 2`, as in
    unilm `beit/utils.py`.
    """
    total = int(epochs * niter_per_ep)
    if total <= 0:
        raise ValueError(f"a schedule needs at least one step (epochs={epochs}, niter_per_ep={niter_per_ep})")
    warmup_iters = warmup_steps if warmup_steps > 0 else int(round(warmup_epochs * niter_per_ep))
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def poly_scheduler(base_value: float, final_value: float, total_steps: int, warmup_steps: int, power: float = 1.0,
                   warmup_ratio: float = 1e-6) -> np.ndarray:
    """mmseg `PolyLrUpdaterHook` by iteration: `(base - final)(1 - i / total)^power + final`; during the first
    `warmup_steps` it is scaled by `1 - (1 - i / warmup_steps)(1 - warmup_ratio)` (mmcv's linear warm-up)."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
    steps = np.arange(total_steps, dtype=np.float64)
    schedule = (base_value - final_value) * (1 - steps / total_steps) ** power + final_value
    if warmup_steps > 0:
        warm = steps < warmup_steps
        schedule[warm] *= 1 - (1 - steps[warm] / warmup_steps) * (1 - warmup_ratio)
    return schedule


def step_scheduler(base_value: float, total_steps: int, warmup_steps: int, milestones: tuple[float, ...],
                   factor: float = 0.1, warmup_factor: float = 0.001) -> np.ndarray:
    """detectron2's `WarmupParamScheduler(MultiStepParamScheduler)`: `base × factor^k` after k of the `milestones`
    (fractions of `total_steps`), times `warmup_factor (1 - i / warmup) + i / warmup` over the first `warmup_steps`."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
    steps = np.arange(total_steps, dtype=np.float64)
    drops = sum((steps >= round(fraction * total_steps)).astype(np.float64) for fraction in milestones)
    schedule = base_value * factor ** drops
    if warmup_steps > 0:
        warm = steps < warmup_steps
        alpha = steps[warm] / warmup_steps
        schedule[warm] *= warmup_factor * (1 - alpha) + alpha
    return schedule


@dataclass
class Schedules:
    lr: np.ndarray  # [total_steps]
    wd: np.ndarray  # [total_steps]


def build_schedules(optim: OptimSettings, base_lr: float, total_steps: int, steps_per_epoch: int) -> Schedules:
    """LR and WD for each of `total_steps` optimizer steps; warm-up in steps, or in epochs of `steps_per_epoch`."""
    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    warmup = optim.warmup_steps if optim.warmup_steps >= 0 else int(round(optim.warmup_epochs * steps_per_epoch))
    if optim.lr_schedule == "poly":
        lr = poly_scheduler(base_lr, optim.min_lr, total_steps, warmup, optim.poly_power)
    elif optim.lr_schedule == "step":
        lr = step_scheduler(base_lr, total_steps, warmup, optim.lr_steps)
    else:
        lr = cosine_scheduler(base_lr, optim.min_lr, 1, total_steps, warmup_steps=warmup)
    return Schedules(lr=lr, wd=cosine_scheduler(optim.weight_decay, wd_end, 1, total_steps))


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int) -> tuple[float, float]:
    """Writes this step's LR (× each group's lr_scale) and WD (groups with weight decay only); returns (lr, wd)."""
    lr, wd = float(schedules.lr[step]), float(schedules.wd[step])
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group["weight_decay"] > 0:
            group["weight_decay"] = wd
    return lr, wd

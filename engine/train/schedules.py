"""Per-step schedules: the official BEiT `cosine_scheduler` (linear warmup from `start_warmup_value`, then cosine)."""

import math

import numpy as np


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

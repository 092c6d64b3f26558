"""The health of the steps (non-finite losses, fp16 overflow skips), checked where the loop talks to the host anyway,
so that it never stalls the device (stop signals: engine/stop_signal.py)."""

import logging

import torch

logger = logging.getLogger(__name__)

def loss_scale(engine) -> float | None:
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    scale = getattr(optimizer, "cur_scale", None)
    return float(scale if scale is not None else optimizer.loss_scale)


class StepHealth:
    """Counts bad steps: a non-finite loss, or an fp16 step DeepSpeed skipped on gradient overflow.

    Under fp16 dynamic loss scaling a bad step is skipped by DeepSpeed (the scale drops) and training goes on; under
    bf16/fp32 nothing rescues a non-finite loss, so training stops at the next check (a log or save step, before
    anything is saved). Either way `max_bad_steps` consecutive bad steps stop the run with an explanation.
    Non-finite losses are counted on the device (`count_step`), read only in `check`.
    """

    def __init__(self, engine, precision: str, max_bad_steps: int, device: torch.device):
        self.engine = engine
        self.precision = precision
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total_skipped = 0
        self._skipped_before = engine.skipped_steps
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # non-finite losses since the last check

    def count_step(self, loss: torch.Tensor) -> None:
        """After every optimizer step: host counters of skipped steps, a device counter of non-finite losses."""
        skipped = self.engine.skipped_steps - self._skipped_before
        self._skipped_before = self.engine.skipped_steps
        self.total_skipped += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.precision != "fp16":
            self._nonfinite += (~torch.isfinite(loss)).to(torch.int64)
        if self.consecutive >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.consecutive} consecutive non-finite/overflowed steps (loss scale {loss_scale(self.engine)}): "
                "fp16 cannot represent this run's gradients; use --precision=bf16, a lower --lr, or a smaller "
                "--clip_grad")

    def check(self, step: int) -> None:
        """Host sync: raise when any loss since the last check was non-finite (bf16/fp32)."""
        bad = int(self._nonfinite)
        if bad:
            raise FloatingPointError(
                f"the loss was non-finite in {bad} step(s) up to step {step} under {self.precision}: lower --lr or "
                "--clip_grad, check the data, or resume from the last checkpoint")

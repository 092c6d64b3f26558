"""What keeps a run safe without stalling the device: stop signals polled with a non-blocking collective, and the
health of the steps (non-finite losses, fp16 overflow skips) checked where the loop talks to the host anyway."""

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_END = object()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # USR1: SLURM's `--signal=USR1@<seconds>` warning


class EvaluationStopped(Exception):
    """Raised on every rank at the same evaluation batch when a stop was polled there (`StopSignal.iterate`)."""


class StopSignal:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop saves a checkpoint at a step boundary and exits cleanly.

    Several ranks agree on the step to stop at without blocking: `poll()` starts an all-reduce of this rank's flag
    (a CPU tensor on a gloo group, so the device queue is never waited on) and reads the one started at the
    previous poll. Every rank polls once per step (and once per evaluation batch, `iterate`), so all of them see the
    same result at the same point: one poll after the signal. A single rank reads its flag directly. Each poll is
    progress for the watchdog (engine/train/watchdog.py), when there is one.
    """

    def __init__(self, watchdog=None):
        self.received: str | None = None
        self.watchdog = watchdog
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._group = None
        self._pending: tuple | None = None  # (work handle, [1] int32 CPU tensor) of the last poll
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = signal.Signals(signum).name
        if first:
            logger.warning("%s received: saving a checkpoint after this step (or evaluation batch), then exiting",
                           self.received)

    def poll(self) -> bool:
        """True on every rank once any rank was signalled (a poll later when there are several ranks)."""
        if self.watchdog is not None:
            self.watchdog.beat()
        if self._group is None:
            return self.received is not None
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.numpy()[0])  # a CPU tensor: reading it does not wait on the device
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, group=self._group, async_op=True), flag)
        return stop

    def iterate(self, items, count: int):
        """Yields `items` (an evaluation loader), polling before each; raises EvaluationStopped on every rank at once
        when a stop is polled. Every rank must pass the same `count`, the most items any rank has: a rank with fewer
        goes on polling without items, so the ranks' polls stay paired."""
        items = iter(items)
        for _ in range(count):
            if self.poll():
                raise EvaluationStopped
            item = next(items, _END)
            if item is not _END:
                yield item

    def restore(self) -> None:
        if self._pending is not None:
            try:
                self._pending[0].wait()  # every rank started this collective: finish it before leaving
            except RuntimeError:  # a peer is gone: the error that ends the run is raised elsewhere
                pass
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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

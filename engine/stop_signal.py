"""Stop signals (SIGTERM, SIGINT, SLURM's SIGUSR1) turned into a clean stop at a step boundary, agreed on by every
rank without blocking the device: used by the training loop (engine/train/loop.py) and the tokenizer's training."""

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

"""A failed rank ends the job: a thread per rank that exits the process when the training loop stops making progress.

When one rank dies (OOM, a lost node), the others block in their next collective. Gloo notices a closed connection
at once, NCCL only when the collective times out; a frozen node (or a rank stuck outside any collective) closes
nothing. The watchdog covers all of these with one bound, `--dist_timeout_s`:

- the loop calls `beat(where)` at every step, evaluation batch and save (`StopSignal.poll` beats too);
- a daemon thread publishes this rank's last beat to the job's rendezvous store every few seconds
  (`beit_watchdog/<rank>` = "seconds since the epoch | where") and checks its own;
- when this rank has not beaten for `timeout_s`, it logs one line naming where it waits (the step, and the innermost
  engine frame of the main thread) and the ranks that went silent (their last step), then ends the process with
  exit status 3. Launchers then stop the job's other processes; every rank left on its own times out alike.

The newest complete checkpoint is never touched (checkpoints are renamed into place only once whole), so the same
command resumes from it. The collectives' own timeout is set a minute later (engine/train/runtime.py) as a backstop.
"""

import logging
import os
import sys
import threading
import time
import traceback
from datetime import timedelta

logger = logging.getLogger(__name__)

EXIT_STALLED = 3
_KEY = "beit_watchdog/{}"
_ENGINE_DIR = os.sep + "engine" + os.sep


def _main_thread_frames() -> tuple[str, str]:
    """(innermost engine frame, innermost frame) of the main thread, as 'file:line function'."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?", "?"
    stack = traceback.extract_stack(frame)
    fmt = lambda entry: f"{os.path.relpath(entry.filename)}:{entry.lineno} {entry.name}"  # noqa: E731
    ours = [entry for entry in stack if _ENGINE_DIR in entry.filename and "watchdog" not in entry.filename]
    return (fmt(ours[-1]) if ours else "?"), fmt(stack[-1])


class Watchdog:
    """Start with `Watchdog(timeout_s, rank, world_size, master_addr, master_port)`; armed by the first `beat(where)`
    from the loop; `close()` when the run's collective part is over (the end of `train`), before anything that may
    take long without beating (a probe)."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, master_addr: str, master_port: int,
                 interval_s: float | None = None):
        import torch.distributed as dist

        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.interval_s = interval_s or min(10.0, timeout_s / 6)
        self.where = "start-up"
        self._last: float | None = None  # armed by the first beat (start-up phases are bounded by the collectives)
        self._stop = threading.Event()
        self._store = None
        try:  # a client of the rendezvous store (the launcher's or rank 0's): heartbeats of every rank
            self._store = dist.TCPStore(master_addr, master_port, is_master=False, wait_for_workers=False,
                                        timeout=timedelta(seconds=max(5.0, self.interval_s)))
        except Exception as err:  # noqa: BLE001 - the watchdog still ends a stalled rank without it
            logger.warning("watchdog: no rendezvous store at %s:%s (%s); a stall will not name the other ranks",
                           master_addr, master_port, err)
        self._thread = threading.Thread(target=self._run, name="beit-watchdog", daemon=True)
        self._thread.start()

    def beat(self, where: str | None = None) -> None:
        """Progress: cheap, from the main thread (two attribute writes)."""
        if where is not None:
            self.where = where
        self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _publish(self) -> None:
        if self._store is not None:
            age = 0.0 if self._last is None else time.monotonic() - self._last
            self._store.set(_KEY.format(self.rank), f"{time.time() - age:.1f}|{self.where}")

    def _silent_ranks(self) -> str:
        """The other ranks whose last beat is about as old as this rank's stall, the longest silent first (when one
        rank hangs, the others soon wait on it too: the first to go quiet is the one to look at)."""
        if self._store is None:
            return "the other ranks are unknown (no rendezvous store)"
        found, now = [], time.time()
        for rank in range(self.world_size):
            key = _KEY.format(rank)
            if rank == self.rank:
                continue
            if not self._store.check([key]):
                found.append((float("inf"), rank, ""))
                continue
            stamp, where = self._store.get(key).decode().split("|", 1)
            found.append((now - float(stamp), rank, where))
        silent = sorted((entry for entry in found if entry[0] > self.timeout_s - self.interval_s), reverse=True)
        if not silent:
            return "every other rank is still beating"
        named = [f"rank {rank} (no heartbeat yet)" if age == float("inf") else
                 f"rank {rank} (silent for {age:.0f} s, last at {where})" for age, rank, where in silent[:8]]
        more = f" and {len(silent) - 8} more" if len(silent) > 8 else ""
        return "silent, longest first: " + ", ".join(named) + more

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - the store's host (rank 0 or the launcher) may be gone
                pass
            stalled = 0.0 if self._last is None else time.monotonic() - self._last
            if stalled < self.timeout_s:
                continue
            try:
                others = self._silent_ranks()
            except Exception as err:  # noqa: BLE001
                others = f"the rendezvous store is unreachable ({err}): rank 0 or its node is probably gone"
            ours, innermost = _main_thread_frames()
            logger.error("rank %d: no progress for %.0f s at %s (waiting in %s, innermost %s); %s. Ending this "
                         "process (exit %d) so the job ends; the same command resumes from the newest complete "
                         "checkpoint. The limit is --dist_timeout_s=%g.", self.rank, stalled, self.where, ours,
                         innermost, others, EXIT_STALLED, self.timeout_s)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_STALLED)

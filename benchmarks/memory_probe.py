"""One rank of `benchmarks/bench_memory.py`: the pretraining recipe, run as a user runs it, with memory marks.

    python benchmarks/memory_probe.py SPEC.json    # started once per rank by bench_memory.py (RANK, WORLD_SIZE set)

SPEC: {"recipe": "pretrain_large", "overrides": [...], "result": "rank{rank}.json"}. The rank's resident memory is
read at marks around the engine's own calls (model build, DeepSpeed initialisation, the first training step), each
after `gc` + `malloc_trim` so that freed memory does not count, and the kernel's peak (VmHWM) is reset at each mark so
that every phase has its own peak. A thread samples the DataLoader workers (children of the rank): their largest
resident set and their largest unique set (pages no other process shares: what a worker really copied).
"""

import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]
MB = 2**20


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {field}")


class Marks:
    """Trimmed resident memory at each mark and the peak of the phase that ends there."""

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6")
        self.rss_mb: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.peak_mb[name] = _status_mb("VmHWM")  # the peak since the previous mark
        gc.collect()
        self._libc.malloc_trim(0)
        self.rss_mb[name] = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


class WorkerSampler(threading.Thread):
    """The largest RSS and USS of any child process (DataLoader worker), sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.rss_mb, self.uss_mb, self.count = interval_s, 0.0, 0.0, 0
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.wait(self.interval_s):
            children = me.children(recursive=True)
            self.count = max(self.count, len(children))
            for child in children:
                try:
                    info = child.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.rss_mb, self.uss_mb = max(self.rss_mb, info.rss / MB), max(self.uss_mb, info.uss / MB)

    def stop(self) -> None:
        self._done.set()
        self.join()


def instrument(marks: Marks) -> None:
    """Marks around the engine's model build, DeepSpeed initialisation and first two training steps (the first
    allocates the optimizer states, the second shows what a step needs on top of them)."""
    import engine.factory
    import engine.train.loop as loop

    def around(owner, name: str, before: str, after: str, calls: int = 1):
        original, count = getattr(owner, name), [0]

        def wrapped(*args, **kwargs):
            count[0] += 1
            suffix = "" if count[0] == 1 else str(count[0])
            if count[0] <= calls:
                marks.mark(before + suffix)
            result = original(*args, **kwargs)
            if count[0] <= calls:
                marks.mark(after + suffix)
            return result

        setattr(owner, name, wrapped)

    around(engine.factory, "create_model", "before_model", "model")  # not the export's, at the end
    around(loop, "initialize_engine", "before_engine", "engine")
    around(loop, "train_step", "before_step", "step", calls=2)


def main(spec_file: str) -> None:
    import importlib

    from engine.config import apply_overrides
    from engine.train.pretrain import run_pretraining

    spec = json.loads(Path(spec_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    marks, workers = Marks(), WorkerSampler()
    marks.mark("start")
    instrument(marks)
    cfg = apply_overrides(importlib.import_module(spec["recipe"]).config(), spec["overrides"])
    workers.start()
    started = time.perf_counter()
    run_pretraining(cfg)
    seconds = time.perf_counter() - started
    marks.mark("end")  # the peak of the rest of the run: later steps, checkpoint, export
    workers.stop()
    result = {"rank": rank, "rss_mb": marks.rss_mb, "peak_mb": marks.peak_mb, "seconds": round(seconds, 1),
              "workers": workers.count, "worker_rss_mb": workers.rss_mb, "worker_uss_mb": workers.uss_mb}
    Path(spec["result"].format(rank=rank)).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])

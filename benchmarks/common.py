"""Shared benchmark plumbing: device choice, timing, peak memory and the JSONL result rows.

On CUDA: `triton.testing.do_bench` medians (quantiles 0.5/0.2/0.8) and `torch.cuda.max_memory_allocated`.
On CPU: median of a few wall-clock runs, no memory figure, rows labelled device=cpu. Kernels of ours run on CPU only
through Triton's interpreter, which a script enables (before importing triton) with `use_interpreter_on_cpu()`.
"""

import datetime
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def use_interpreter_on_cpu() -> bool:
    """Turn on Triton's interpreter when there is no GPU; call before the first `import triton`. True on CPU."""
    on_cpu = shutil.which("nvidia-smi") is None
    if on_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return on_cpu


def measure_ms(fn: Callable[[], object], device: str, cpu_repeats: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of `fn()`."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up (first interpreter/JIT pass)
    times = []
    for _ in range(cpu_repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak allocated CUDA memory of one `fn()` call above what was allocated before it; None on CPU."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=RESULTS_DIR.parent)
        return result.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def environment(device: str) -> dict:
    """Fields every row carries: device name, versions, commit, date."""
    import torch
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__, "triton": triton.__version__,
            "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append rows to `benchmarks/results/<name>.jsonl` and print them."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            print(json.dumps(row))
    return path


INTERPRETER_NOTE = "Triton interpreter on CPU: correctness only, not a speed figure"


def measure_row(base: dict, measure: Callable[[], dict], interpreted: bool) -> dict:
    """One result row: `base` plus what `measure()` returns, or the error it raised, so that one failing provider
    never hides the others. `interpreted` rows (our kernels through Triton's CPU interpreter) carry a note."""
    row = dict(base, note=INTERPRETER_NOTE) if interpreted else dict(base)
    try:
        row.update(measure())
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"[:300]
    return row

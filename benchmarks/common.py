"""Shared benchmark plumbing: device choice, timing, peak memory and the JSONL result rows.

On CUDA: `triton.testing.do_bench` medians (quantiles 0.5/0.2/0.8) and `torch.cuda.max_memory_allocated`.
On CPU: median of a few wall-clock runs, no memory figure, rows labelled device=cpu. Kernels of ours run on CPU only
through Triton's interpreter, which a script enables (before importing triton) with `use_interpreter_on_cpu()`.
Every kernel script takes `--out DIR` (where its JSONL goes; default benchmarks/results/) and `--shapes A,B` (a subset
of its GPU shapes; names are checked on CPU too, so a typo fails before a GPU window is spent on it).
"""

import argparse
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
REPO_ROOT = Path(__file__).resolve().parents[1]
# A copy of the repository without .git (a bare GPU node) names its commit in one of these files (`make gpu-wheels`).
COMMIT_FILES = (REPO_ROOT / "COMMIT", REPO_ROOT / ".whl" / "COMMIT")


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


def commit_id() -> str:
    """The short git commit; without git metadata the first COMMIT_FILES entry that exists; else "uncommitted"."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=REPO_ROOT)
        return result.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for path in COMMIT_FILES:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    return "uncommitted"


def environment(device: str) -> dict:
    """Fields every row carries: device name, versions, commit, date."""
    import torch
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit_id(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1", **_run_id()}


def _run_id() -> dict:
    """`{"run_id": ...}` when a driver (benchmarks/gpu_check.py) set BENCH_RUN_ID: it picks its own rows out of
    result files that also hold earlier runs."""
    run_id = os.environ.get("BENCH_RUN_ID")
    return {"run_id": run_id} if run_id else {}


def append_rows(name: str, rows: list[dict], out_dir: str | Path | None = None) -> Path:
    """Append rows to `<out_dir>/<name>.jsonl` (default `benchmarks/results/`) and print them."""
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
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


def parse_bench_args(argv: list[str] | None, description: str, gpu_shapes: list[tuple]) -> argparse.Namespace:
    """`--out DIR` and `--shapes NAME,...` (names from `gpu_shapes`, each shape tuple starting with its name).
    `argv=None` means no arguments (a test calling `main()`), not `sys.argv`. A bad shape name exits with one line."""
    names = [shape[0] for shape in gpu_shapes]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help=f"directory for the JSONL rows (default {RESULTS_DIR})")
    parser.add_argument("--shapes", default="", help=f"comma-separated GPU shapes (default all: {','.join(names)}); "
                        "a CPU run always uses its tiny shape")
    args = parser.parse_args([] if argv is None else argv)
    args.shapes = [name for name in args.shapes.split(",") if name]
    unknown = [name for name in args.shapes if name not in names]
    if unknown:
        parser.exit(2, f"{parser.prog}: unknown shape {', '.join(unknown)}; choose from {', '.join(names)}\n")
    return args


def select_shapes(gpu_shapes: list[tuple], cpu_shapes: list[tuple], on_cpu: bool, names: list[str]) -> list[tuple]:
    """The CPU's tiny shapes on CPU; on a GPU the shapes named (all when none are)."""
    if on_cpu:
        return cpu_shapes
    return [shape for shape in gpu_shapes if not names or shape[0] in names]

"""Masks per second of the Python and native masking backends on the CPU.

Times `MaskingGenerator.batch` (median of several runs, each a fresh epoch so no run repeats another's masks),
prints a table and appends one JSON row per (backend, shape) to benchmarks/results/masking.jsonl.

    python benchmarks/bench_masking.py [--batch 4096] [--repeats 5] [--threads 1]
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from engine.data import masking
from engine.data.masking import MaskingGenerator

RESULTS = Path(__file__).resolve().parent / "results" / "masking.jsonl"
# (grid side, masked patches, smallest block): BEiT-B/16 at 224 px, and a 112 px / 16 grid.
CASES = [(14, 75, 16), (7, 20, 4)]


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


def masks_per_second(generator: MaskingGenerator, batch: int, repeats: int) -> float:
    generator.batch(seed=0, epoch=0, indices=range(min(batch, 64)))  # warm-up
    seconds = []
    for epoch in range(1, repeats + 1):
        start = time.perf_counter()
        generator.batch(seed=0, epoch=epoch, indices=range(batch))
        seconds.append(time.perf_counter() - start)
    return batch / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="masks per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="native backend threads")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON-lines file the rows are appended to")
    args = parser.parse_args()

    backends = ["python"] + (["native"] if masking._native_masking is not None else [])
    if "native" not in backends:
        print("native extension not built (pip install -e . or python setup.py build_ext --inplace): python only")
    common = {
        "device": "cpu", "cpu": cpu_model(), "numpy": np.__version__, "python": platform.python_version(),
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch, "repeats": args.repeats,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'backend':<8} {'shape':<10} {'masks/s':>12}")
    with args.output.open("a") as results:
        for side, target, min_area in CASES:
            for backend in backends:
                generator = MaskingGenerator(side, target, min_area, backend=backend, num_threads=args.threads)
                rate = masks_per_second(generator, args.batch, args.repeats)
                shape = f"{side}x{side}/{target}"
                print(f"{backend:<8} {shape:<10} {rate:>12,.0f}")
                row = {"benchmark": "masking", "backend": backend, "shape": shape, "min_num_patches": min_area,
                       "threads": args.threads if backend == "native" else 1, "masks_per_s": round(rate, 1),
                       **common}
                results.write(json.dumps(row) + "\n")
    print(f"appended {len(CASES) * len(backends)} rows to {args.output}")


if __name__ == "__main__":
    main()

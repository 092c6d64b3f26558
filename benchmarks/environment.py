"""Record the machine a benchmark ran on: GPU (name, SMs, memory, driver), versions, DeepSpeed and nvcc, commit.

    python3 benchmarks/environment.py --out DIR   # writes DIR/environment.json and prints it

The first step of benchmarks/gpu_check.py. It runs anywhere (device "cpu" without a GPU) and reports a missing
optional piece (DeepSpeed, flash-attn, nvcc) as a field instead of failing: what is missing is what it is for.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import commit_id  # noqa: E402


def _version_or_error(module_name: str) -> dict:
    """`{"version", "path"}` of an importable module, else `{"error"}` (one line)."""
    try:
        module = __import__(module_name)
    except Exception as error:  # ImportError, or a broken install raising anything at import
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
    return {"version": getattr(module, "__version__", "unknown"), "path": str(Path(module.__file__).parent)}


def _driver_version() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def gpu_fields(torch) -> dict:
    """Device 0's properties, or `{"device": "cpu"}` without a GPU."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu_count": 0}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "gpu_count": torch.cuda.device_count(), "gpu_name": props.name,
            "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "driver": _driver_version(),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def record() -> dict:
    import torch
    import triton
    from torch.utils.cpp_extension import CUDA_HOME

    return {
        **gpu_fields(torch),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton.__version__, "deepspeed": _version_or_error("deepspeed"),
        "flash_attn": _version_or_error("flash_attn"),
        "nvcc": shutil.which("nvcc"), "cuda_home": CUDA_HOME,  # DeepSpeed builds its CUDA ops with nvcc at first use
        "cpu_count": os.cpu_count(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "commit": commit_id(), "pythonpath": os.environ.get("PYTHONPATH", ""),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for environment.json")
    args = parser.parse_args(argv)
    fields = record()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(fields, indent=2) + "\n")
    print(json.dumps(fields, indent=2))


if __name__ == "__main__":
    main()

"""Settings of the pytest-benchmark suite (`pytest benchmarks --benchmark-only`, see benchmarks/README.md).

Without a GPU our Triton kernels run through Triton's interpreter, which must be switched on before triton is first
imported: here, before pytest imports the benchmark modules. The repository root goes on sys.path so that the suite
runs from a checkout without `pip install -e .`. The main suite never collects this directory (`testpaths`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import use_interpreter_on_cpu  # noqa: E402

use_interpreter_on_cpu()

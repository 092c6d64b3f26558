"""Device dispatch shared by the kernels: Triton for CUDA tensors, PyTorch for CPU tensors.

Like a torch op with a CPU and a CUDA kernel, each public function picks its implementation from the device of its
input: Triton kernels run on CUDA tensors, and on any tensor when Triton's interpreter is active
(`TRITON_INTERPRET=1`, how the CPU-only test suite exercises the kernels); CPU tensors otherwise take the PyTorch
reference. The choice is read per call (never at import) and logged once per op and backend.
"""

import logging
import os

import torch

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(op_name: str, tensor: torch.Tensor) -> bool:
    """Whether `op_name` runs its Triton kernels on `tensor` (CUDA or interpreter) or its PyTorch path (CPU)."""
    triton_path = tensor.is_cuda or triton_interpreter_active()
    backend = "triton" if triton_path else "pytorch (cpu tensor, no TRITON_INTERPRET=1)"
    if (op_name, backend) not in _logged:
        _logged.add((op_name, backend))
        logger.info("kernels.%s runs on %s", op_name, backend)
    return triton_path

"""Where the Triton kernels can run, and the one clear error when they cannot.

Triton kernels run on CUDA tensors, and on any tensor under Triton's CPU interpreter (`TRITON_INTERPRET=1`, set
before triton is imported: how the CPU-only test suite exercises them). The user-chosen backends built on them
(`attn_impl="triton"` → `beit_kernels.rel_pos_attention`, `mlm_loss="fused"` → `beit_kernels.masked_lm_loss`) are
resolved once, when the model is built (`require_triton_available`), and called on a tensor where Triton cannot run they
raise (`require_triton_on`): never a silent switch to the PyTorch reference.

`beit_kernels.rel_pos_bias` is different: one op with two implementations (a Triton gather for CUDA tensors, the
PyTorch gather for CPU tensors), like a torch op with CPU and CUDA kernels, used inside the eager and sdpa paths.
It dispatches on its input's device (`use_triton`), and logs which implementation runs once per op and backend.
"""

import logging
import os

import torch

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()
_INTERPRETER_HINT = "or set TRITON_INTERPRET=1 before importing triton to debug the kernels on CPU (slowly)"


def triton_interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device`."""
    return device.type == "cuda" or triton_interpreter_active()


def triton_available() -> bool:
    """Whether this process can run Triton kernels at all (a visible CUDA device, or the interpreter)."""
    return torch.cuda.is_available() or triton_interpreter_active()


def require_triton_available(choice: str, alternative: str) -> None:
    """At model build: `choice` (e.g. "attn_impl='triton'") needs Triton; fail with the fix when it cannot run."""
    if not triton_available():
        raise ValueError(f"{choice} runs Triton kernels, which need a CUDA GPU, and none is visible; choose "
                         f"{alternative} on this machine, {_INTERPRETER_HINT}")


def require_triton_on(op_name: str, tensor: torch.Tensor) -> None:
    """At call: `beit_kernels.<op_name>` runs only Triton kernels; a tensor where they cannot run is an error."""
    if not triton_runs_on(tensor.device):
        raise RuntimeError(f"beit_kernels.{op_name} runs Triton kernels and got a {tensor.device.type} tensor; move "
                           f"the inputs to a CUDA device, call beit_kernels.{op_name}_ref on CPU, {_INTERPRETER_HINT}")


def use_triton(op_name: str, tensor: torch.Tensor) -> bool:
    """Device dispatch of a two-implementation op: True for its Triton path (CUDA or interpreter), else PyTorch."""
    triton_path = triton_runs_on(tensor.device)
    backend = "triton" if triton_path else "pytorch (cpu tensor, no TRITON_INTERPRET=1)"
    if (op_name, backend) not in _logged:
        _logged.add((op_name, backend))
        logger.info("beit_kernels.%s runs on %s", op_name, backend)
    return triton_path

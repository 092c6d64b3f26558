"""Test-wide settings.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable must be set before
triton is first imported, which is why it lives here and not in the kernels package (no import-time switches there).
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

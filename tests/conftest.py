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


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A randomly initialised 14 px → 7×7 tokenizer (vocab 64), as the demo's: labels without training one."""
    from engine.tokenizer import save_tokenizer
    from engine.tokenizer.dalle import DalleEncoder

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(out, DalleEncoder(group_count=2, n_hid=16, n_blk_per_group=1, vocab_size=64), input_size=14)
    return out

"""Kernels of the engine: each op as a one-line functional API, with its PyTorch reference beside it.

Where they run (see `beit_kernels._dispatch`): `rel_pos_attention` and `masked_lm_loss` are Triton kernels only (CUDA
tensors, or any tensor under `TRITON_INTERPRET=1`); on a CPU tensor otherwise they raise, and their `_ref` is the CPU
path. `rel_pos_bias` has both implementations and picks by its input's device.
"""

from beit_kernels.masked_lm_loss import masked_lm_loss, masked_lm_loss_ref
from beit_kernels.rel_pos_attention import rel_pos_attention, rel_pos_attention_ref
from beit_kernels.rel_pos_bias import rel_pos_bias, rel_pos_bias_ref

__all__ = [
    "masked_lm_loss",
    "masked_lm_loss_ref",
    "rel_pos_attention",
    "rel_pos_attention_ref",
    "rel_pos_bias",
    "rel_pos_bias_ref",
]

"""Kernels of the engine: each op as a one-line functional API, with its PyTorch reference beside it.

Device dispatch (see `kernels._dispatch`): Triton kernels for CUDA tensors, or for any tensor under
`TRITON_INTERPRET=1`; the PyTorch reference for CPU tensors otherwise.
"""

from kernels.masked_lm_loss import masked_lm_loss, masked_lm_loss_ref
from kernels.rel_pos_attention import rel_pos_attention, rel_pos_attention_ref
from kernels.rel_pos_bias import rel_pos_bias, rel_pos_bias_ref

__all__ = [
    "masked_lm_loss",
    "masked_lm_loss_ref",
    "rel_pos_attention",
    "rel_pos_attention_ref",
    "rel_pos_bias",
    "rel_pos_bias_ref",
]

"""Kernels of the engine: each op as a one-line functional API, with its PyTorch reference beside it."""

from kernels.masked_lm_loss import masked_lm_loss_ref
from kernels.rel_pos_bias import rel_pos_bias, rel_pos_bias_ref

__all__ = ["masked_lm_loss_ref", "rel_pos_bias", "rel_pos_bias_ref"]

"""Relative position bias: gather a `[R, H]` table through an `[N, N]` index into an `[H, N, N]` additive bias.

Used by the eager and sdpa attention paths (the triton path reads the table inside the attention kernel).
"""

import torch


def rel_pos_bias_ref(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference. bias_table `[R, H]`, rel_index `[N, N]` integer in `[0, R)` → `[H, N, N]`.

    Autograd turns the gather into a scatter-add into the table, so this is also differentiable.
    """
    n_query, n_key = rel_index.shape
    bias = bias_table[rel_index.reshape(-1)].view(n_query, n_key, -1)  # [N, N, H]
    return bias.permute(2, 0, 1).contiguous()  # [H, N, N]


def rel_pos_bias(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """`bias_table[rel_index].permute(2, 0, 1)`: `[R, H]`, `[N, N]` → `[H, N, N]`, differentiable in the table."""
    return rel_pos_bias_ref(bias_table, rel_index)

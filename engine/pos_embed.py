"""Relative position index of BEiT: which row of the `[R, H]` bias table each (query, key) token pair reads.

Legend: Wh, Ww = token grid (window) height and width; N = Wh*Ww + 1 tokens (CLS first); R = table rows.
Patch pairs read row `(dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1)` for the offset (dy, dx) = query - key; the last
three rows are the CLS pairs, as in the official `modeling_finetune.RelativePositionBias`:
cls→token = R-3, token→cls = R-2, cls→cls = R-1.
"""

import torch


def _checked_window(window_size: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(side) for side in window_size)
    if height < 1 or width < 1:
        raise ValueError(f"window_size must be two positive ints (token grid height, width), got {window_size}")
    return height, width


def num_relative_distance(window_size: tuple[int, int]) -> int:
    """Rows R of the relative position bias table: `(2Wh-1)(2Ww-1)` patch offsets plus 3 CLS rows."""
    height, width = _checked_window(window_size)
    return (2 * height - 1) * (2 * width - 1) + 3


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """Table row for every (query, key) pair: LongTensor `[N, N]`, N = Wh*Ww + 1, values in `[0, R)`."""
    height, width = _checked_window(window_size)
    num_rows = num_relative_distance((height, width))
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)  # [2, L]
    offsets = coords[:, :, None] - coords[:, None, :]  # [2, L, L] query minus key, row-major patches
    patch_rows = (offsets[0] + height - 1) * (2 * width - 1) + (offsets[1] + width - 1)  # [L, L]
    num_tokens = height * width + 1
    index = torch.empty(num_tokens, num_tokens, dtype=torch.long)  # [N, N]
    index[1:, 1:] = patch_rows
    index[0, :] = num_rows - 3  # cls → token
    index[:, 0] = num_rows - 2  # token → cls
    index[0, 0] = num_rows - 1  # cls → cls
    return index

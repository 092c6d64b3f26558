"""Resize position parameters of a checkpoint to a model with another token grid (e.g. fine-tuning 224 → 384).

Relative position bias tables use the official BEiT method (`run_class_finetuning.py`): the `(2Wh-1) × (2Ww-1)` patch
offsets of the source are placed on a non-uniform grid whose spacing grows geometrically away from the centre, so
that the source spans the target's offsets `-t..t`; each head is then interpolated with a bicubic spline onto the
uniform target grid. The 3 CLS rows are copied unchanged.

The official code used `scipy.interpolate.interp2d(kind='cubic')` (removed in SciPy 1.14). On a full rectangular grid
that is FITPACK's interpolating bicubic spline (`s=0`), whose knots are the data points except the second and the
second-to-last: the tensor product of one-dimensional *not-a-knot* cubic splines. This module computes exactly that
in torch (float64), so scipy is not needed. Like FITPACK's evaluator, targets outside the source span are clamped to
its edge. Axes with fewer than 4 points fall back to the polynomial through all points (what not-a-knot degenerates
to, as in `scipy.interpolate.CubicSpline`).

Absolute position embeddings use bicubic `F.interpolate`, keeping the CLS token, as the official loader does.
"""

import torch
import torch.nn.functional as F

from engine.pos_embed import num_relative_distance

NUM_CLS_ROWS = 3  # cls→token, token→cls, cls→cls rows at the end of a relative position bias table


def geometric_ratio(num_src_steps: int, target_extent: float, low: float = 1.01, high: float = 1.5) -> float:
    """Ratio q in [low, high] with `1 + q + ... + q^(num_src_steps-1) ≈ target_extent`, by bisection (official)."""
    q = (low + high) / 2.0
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if (1.0 - q**num_src_steps) / (1.0 - q) > target_extent:
            high = q
        else:
            low = q
    return q


def geometric_offsets(src_len: int, dst_len: int) -> torch.Tensor:
    """Source sample positions `[src_len]` (float64), symmetric about 0, spanning about the target's `-t..t`.

    `src_len`, `dst_len` are odd table side lengths `2W-1`. Position i steps away from the centre sits at
    `1 + q + ... + q^(i-1)`, the official BEiT layout.
    """
    half = src_len // 2
    q = geometric_ratio(half, dst_len // 2)
    steps = q ** torch.arange(half, dtype=torch.float64)  # [half] distances between neighbours, outwards
    right = torch.cumsum(steps, 0)  # [half]
    return torch.cat([-right.flip(0), torch.zeros(1, dtype=torch.float64), right])


def _not_a_knot_second_derivatives(x: torch.Tensor) -> torch.Tensor:
    """Matrix `[n, n]` mapping sample values to the spline's second derivatives at the knots (n >= 4)."""
    n = x.numel()
    h = x[1:] - x[:-1]  # [n-1]
    lhs = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):  # continuity of the first derivative at interior knots
        lhs[i, i - 1], lhs[i, i], lhs[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        rhs[i, i - 1], rhs[i, i], rhs[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    # not-a-knot: the third derivative is continuous at x[1] and x[n-2] (one cubic over the first two intervals)
    lhs[0, 0], lhs[0, 1], lhs[0, 2] = h[1], -(h[0] + h[1]), h[0]
    lhs[-1, -3], lhs[-1, -2], lhs[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    return torch.linalg.solve(lhs, rhs)


def cubic_spline_weights(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Linear map `[T, n]` from values at increasing knots `x [n]` to a not-a-knot cubic spline at `targets [T]`.

    Targets outside `[x[0], x[-1]]` are clamped. With fewer than 4 knots the interpolating polynomial is used.
    """
    x = x.to(torch.float64)
    t = targets.to(torch.float64).clamp(x[0], x[-1])
    n = x.numel()
    if n < 4:  # Lagrange basis: weight of knot j at t = prod_{m != j} (t - x_m) / (x_j - x_m)
        weights = torch.ones(t.numel(), n, dtype=torch.float64)
        for j in range(n):
            for m in range(n):
                if m != j:
                    weights[:, j] *= (t - x[m]) / (x[j] - x[m])
        return weights
    second = _not_a_knot_second_derivatives(x)  # [n, n]
    left = torch.searchsorted(x, t, right=True).sub(1).clamp(0, n - 2)  # [T] interval index
    x0, x1 = x[left], x[left + 1]
    width = x1 - x0
    a, b = (x1 - t) / width, (t - x0) / width  # [T] barycentric coordinates in the interval
    eye = torch.eye(n, dtype=torch.float64)
    # S(t) = a y0 + b y1 + ((a^3 - a) M0 + (b^3 - b) M1) width^2 / 6
    curvature = (width**2 / 6)[:, None]
    return (
        a[:, None] * eye[left]
        + b[:, None] * eye[left + 1]
        + curvature * ((a**3 - a)[:, None] * second[left] + (b**3 - b)[:, None] * second[left + 1])
    )


def _axis_weights(src_len: int, dst_len: int) -> torch.Tensor:
    """Interpolation matrix `[dst_len, src_len]` for one axis of the offset grid (identity when sizes agree)."""
    if src_len == dst_len:
        return torch.eye(src_len, dtype=torch.float64)
    half = dst_len // 2
    targets = torch.arange(-half, half + 1, dtype=torch.float64)  # [dst_len] uniform offsets -t..t
    return cubic_spline_weights(geometric_offsets(src_len, dst_len), targets)


def resize_rel_pos_bias_table(
    table: torch.Tensor, src_window: tuple[int, int], dst_window: tuple[int, int]
) -> torch.Tensor:
    """Resize a relative position bias table `[R_src, H]` from token grid `src_window` to `dst_window`.

    `R = (2Wh-1)(2Ww-1) + 3`; the table rows are row-major over (dy, dx) offsets followed by the 3 CLS rows
    (see `engine.pos_embed`). Returns `[R_dst, H]` in the input dtype; the input itself when the windows agree.
    """
    src_window, dst_window = tuple(src_window), tuple(dst_window)
    expected_rows = num_relative_distance(src_window)
    if table.ndim != 2 or table.shape[0] != expected_rows:
        raise ValueError(
            f"relative position bias table of shape {tuple(table.shape)} does not fit window {src_window}: "
            f"expected [{expected_rows}, num_heads]"
        )
    if src_window == dst_window:
        return table
    num_relative_distance(dst_window)  # validates dst_window
    src_h, src_w = (2 * side - 1 for side in src_window)
    dst_h, dst_w = (2 * side - 1 for side in dst_window)
    offsets = table[:-NUM_CLS_ROWS].to(torch.float64).reshape(src_h, src_w, -1)  # [2Wh-1, 2Ww-1, H]
    rows, cols = _axis_weights(src_h, dst_h), _axis_weights(src_w, dst_w)  # [dst_h, src_h], [dst_w, src_w]
    resized = torch.einsum("ai,ijh,bj->abh", rows.to(table.device), offsets, cols.to(table.device))
    resized = resized.reshape(dst_h * dst_w, -1).to(table.dtype)  # [R_dst - 3, H]
    return torch.cat([resized, table[-NUM_CLS_ROWS:]], dim=0)


def resize_abs_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize an absolute position embedding `[1, 1 + Gh*Gw, C]` (CLS first) from `src_grid` to `dst_grid`.

    Patch positions are resized with bicubic interpolation (`align_corners=False`, computed in float32); the CLS
    embedding is kept. Returns `[1, 1 + Gh'*Gw', C]` in the input dtype.
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if pos_embed.ndim != 3 or pos_embed.shape[1] != 1 + src_grid[0] * src_grid[1]:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not fit grid {src_grid}: "
            f"expected [1, {1 + src_grid[0] * src_grid[1]}, C]"
        )
    if src_grid == dst_grid:
        return pos_embed
    cls_embed, patch_embed = pos_embed[:, :1], pos_embed[:, 1:]
    channels = pos_embed.shape[-1]
    grid = patch_embed.float().reshape(-1, *src_grid, channels).permute(0, 3, 1, 2)  # [1, C, Gh, Gw]
    grid = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    patch_embed = grid.permute(0, 2, 3, 1).reshape(-1, dst_grid[0] * dst_grid[1], channels).to(pos_embed.dtype)
    return torch.cat([cls_embed, patch_embed], dim=1)

"""Relative position bias: gather a `[R, H]` table through an `[N, N]` index into an `[H, N, N]` additive bias.

Used by the eager and sdpa attention paths, and inside `beit_kernels.rel_pos_attention` (its gather kernel, launched
directly, and the segment sum that turns the attention's dense bias gradient into the table's).

Layers: `_rel_pos_bias_fwd_kernel` (gather) and `_table_grad_kernel` (fixed-order segment sum) → launchers
`rel_pos_bias_forward` / `table_grad_from_dense` → `RelPosBiasFunction` → `rel_pos_bias` (exported from `beit_kernels`).

Limits: the table must be 2-D `[R, H]` with H ≤ 1024 (one register block of heads); indices must lie in `[0, R)`
(not checked on device: an out-of-range index reads out of bounds, like an unchecked gather).
The table gradient is deterministic: it is a sum over the positions of each table row in a fixed (stable-sorted)
order, not an atomic scatter. That order depends on the index alone: a model builds it once (`table_grad_plan`) and
passes it with every call; without it, each backward sorts the `N*N` index again.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from beit_kernels._dispatch import use_triton


def rel_pos_bias_ref(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference. bias_table `[R, H]`, rel_index `[N, N]` integer in `[0, R)` → `[H, N, N]`.

    Autograd turns the gather into a scatter-add into the table, so this is also differentiable.
    """
    n_query, n_key = rel_index.shape
    bias = bias_table[rel_index.reshape(-1)].view(n_query, n_key, -1)  # [N, N, H]
    return bias.permute(2, 0, 1).contiguous()  # [H, N, N]


@triton.jit
def _rel_pos_bias_fwd_kernel(
    TABLE,  # [R, H] bias table, contiguous
    INDEX,  # [P] int32 flattened rel index (P = N*N positions), contiguous
    OUT,  # [H, P] gathered bias, contiguous
    H,  # number of heads
    P,  # number of positions N*N
    BLOCK_P: tl.constexpr,  # positions per program
):
    pid_p = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    valid = offs_p < P
    row = tl.load(INDEX + offs_p, mask=valid, other=0)  # [BLOCK_P] table rows
    value = tl.load(TABLE + row * H + head, mask=valid, other=0.0)
    tl.store(OUT + head * P + offs_p, value, mask=valid)


@triton.jit
def _table_grad_kernel(
    DENSE,  # [H, P] float gradient of the gathered bias (P = N*N), contiguous
    ORDER,  # [P] int32 positions sorted by table row (stable), contiguous
    OFFSETS,  # [R + 1] int32 start of each table row's positions in ORDER
    DTABLE,  # [R, H] fp32 table gradient (output, every element written)
    H,  # number of heads
    P,  # number of positions N*N
    BLOCK_J: tl.constexpr,  # positions summed per step
    BLOCK_H: tl.constexpr,  # next power of two ≥ H
):
    row = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    start = tl.load(OFFSETS + row)
    end = tl.load(OFFSETS + row + 1)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        valid_j = offs_j < end
        pos = tl.load(ORDER + offs_j, mask=valid_j, other=0)
        ptrs = DENSE + offs_h[None, :] * P + pos[:, None]  # [BLOCK_J, BLOCK_H]
        grad = tl.load(ptrs, mask=valid_j[:, None] & (offs_h[None, :] < H), other=0.0)
        acc += tl.sum(grad.to(tl.float32), axis=0)
    tl.store(DTABLE + row * H + offs_h, acc, mask=offs_h < H)


def _check_inputs(bias_table: torch.Tensor, rel_index: torch.Tensor) -> None:
    if bias_table.dim() != 2:
        raise ValueError(f"bias_table must be [R, H], got shape {tuple(bias_table.shape)}")
    if rel_index.dim() != 2 or rel_index.dtype.is_floating_point:
        raise ValueError(f"rel_index must be an integer [N, N] tensor, got {rel_index.dtype} {tuple(rel_index.shape)}")
    if bias_table.shape[1] > 1024:
        raise ValueError(f"at most 1024 heads are supported, got {bias_table.shape[1]}")
    if rel_index.device != bias_table.device:
        raise ValueError(f"rel_index is on {rel_index.device} but bias_table on {bias_table.device}; move one")


class TableGradPlan(NamedTuple):
    """Where each table row's positions are: what the deterministic table gradient sums, fixed by the index."""

    order: torch.Tensor  # [P] int32 positions grouped by table row (stable)
    offsets: torch.Tensor  # [R + 1] int32 start of each row's positions in `order`


def table_grad_plan(rel_index: torch.Tensor, num_rows: int) -> TableGradPlan:
    """One argsort and one count of the `N*N` index (on its device, also `meta`): build once per index."""
    flat = rel_index.reshape(-1).long()  # [P]
    counts = torch.zeros(num_rows, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_rows + 1, device=flat.device, dtype=torch.int32)  # [R + 1]
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return TableGradPlan(torch.argsort(flat, stable=True).to(torch.int32), offsets)


def rel_pos_bias_forward(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """Triton gather: `[R, H]`, `[N, N]` → `[H, N, N]` in the table's dtype."""
    n_query, n_key = rel_index.shape
    heads = bias_table.shape[1]
    positions = n_query * n_key
    index = rel_index.reshape(-1).to(torch.int32).contiguous()  # [P]
    out = torch.empty(heads, n_query, n_key, device=bias_table.device, dtype=bias_table.dtype)
    block_p = 1024
    grid = (triton.cdiv(positions, block_p), heads)
    _rel_pos_bias_fwd_kernel[grid](bias_table.contiguous(), index, out, heads, positions, BLOCK_P=block_p)
    return out


def table_grad_from_dense(dense_grad: torch.Tensor, plan: TableGradPlan) -> torch.Tensor:
    """Deterministic scatter-sum of an `[H, N, N]` bias gradient into an fp32 `[R, H]` table gradient.

    Each table row sums its positions in the plan's stable-sorted order, so repeated calls are bitwise identical.
    Cost: one read of `dense_grad`.
    """
    heads = dense_grad.shape[0]
    order, offsets = plan
    positions, num_rows = order.numel(), offsets.numel() - 1
    dtable = torch.empty(num_rows, heads, device=dense_grad.device, dtype=torch.float32)
    block_h = max(triton.next_power_of_2(heads), 2)
    _table_grad_kernel[(num_rows,)](
        dense_grad.contiguous(), order, offsets, dtable, heads, positions, BLOCK_J=64, BLOCK_H=block_h
    )
    return dtable


class RelPosBiasFunction(torch.autograd.Function):
    """Gather forward, deterministic fp32 segment-sum backward into the table."""

    @staticmethod
    def forward(ctx, bias_table: torch.Tensor, rel_index: torch.Tensor, order: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order, offsets)
        ctx.table_dtype = bias_table.dtype
        return rel_pos_bias_forward(bias_table, rel_index)

    @staticmethod
    def backward(ctx, grad_bias: torch.Tensor):
        dtable = table_grad_from_dense(grad_bias, TableGradPlan(*ctx.saved_tensors))
        return dtable.to(ctx.table_dtype), None, None, None


def rel_pos_bias(bias_table: torch.Tensor, rel_index: torch.Tensor, plan: TableGradPlan | None = None
                 ) -> torch.Tensor:
    """`bias_table[rel_index].permute(2, 0, 1)`: `[R, H]`, `[N, N]` → `[H, N, N]`, differentiable in the table.

    Triton kernels for CUDA tensors (or any tensor under `TRITON_INTERPRET=1`), the PyTorch reference for CPU
    tensors otherwise (see `beit_kernels._dispatch`). The Triton path's table gradient is deterministic (fp32 sums in a
    fixed order); the PyTorch path's is whatever autograd's index backward gives on that device. `plan`
    (`table_grad_plan(rel_index, R)`, built once per index) spares the Triton backward its sort.
    """
    _check_inputs(bias_table, rel_index)
    if not use_triton("rel_pos_bias", bias_table):
        return rel_pos_bias_ref(bias_table, rel_index)
    plan = plan if plan is not None else table_grad_plan(rel_index, bias_table.shape[0])
    return RelPosBiasFunction.apply(bias_table, rel_index, *plan)

"""Attention with a learnable relative position bias read from its table inside the kernel (FlashAttention-style).

    out = softmax(q kᵀ·scale + bias_table[rel_index].permute(2, 0, 1)) v        q, k, v, out: [B, H, N, D]

Forward: online softmax in the exp2 domain over key blocks; the bias of each [BLOCK_M, BLOCK_N] score tile is
gathered from the `[R, H]` table through the `[N, N]` index, so neither the `[B, H, N, N]` scores nor the `[H, N, N]`
bias ever exist in memory. It saves the log2-domain row logsumexp `[B*H, N]` (fp32) for the backward.
Backward: Δ = rowsum(O∘dO); a dK/dV kernel per key block (it also emits dS, the bias gradient) and a dQ kernel per
query block, both recomputing P from the saved logsumexp. dS reaches the fp32 table gradient in one of two ways:
  - default: `tl.atomic_add` through the index (fast, NOT deterministic: fp32 sums in arbitrary order);
  - `deterministic=True` (default when `torch.use_deterministic_algorithms(True)`): the dK/dV programs of one head
    walk a fixed group of batch elements and add dS into a dense fp32 partial `[G, H, N, N]` buffer they own
    (G ≤ B batch groups, chosen to fill the GPU; never `[B, H, N, N]`), summed over G, then scattered into the
    table by a fixed-order segment sum (`kernels.rel_pos_bias.table_grad_from_dense`). Cost: G·H·N²·4 bytes extra
    (BEiT-L at N=197: ≤ 20 MB) and less parallelism in the dK/dV kernel when B·H is small; bitwise reproducible.

Layers: `_fwd_kernel`, `_bwd_preprocess_kernel`, `_bwd_dkdv_kernel`, `_bwd_dq_kernel` → launchers
`rel_pos_attention_forward` / `rel_pos_attention_backward` (registered as torch.library custom ops so torch.compile
treats them as opaque) → `RelPosAttentionFunction` → `rel_pos_attention`; `rel_pos_attention_ref` is the oracle.

Limits: head dim D ≤ 256 (the D block is padded to the next power of two ≥ 16 with masks; fast path D = 64);
any N ≥ 1 (tiles are masked at the edges); q, k, v must share dtype (fp32, fp16 or bf16) and have a unit stride in
the last dim; bias_table `[R, H]` of any float dtype, gradients accumulated in fp32; rel_index `[N, N]` integer in
`[0, R)` (not range-checked on device). fp32 inputs use IEEE fp32 dot products (no TF32).
Dispatch: Triton for CUDA tensors or under `TRITON_INTERPRET=1`; CPU tensors otherwise run the PyTorch reference
(`kernels._dispatch`). CUDA configs are autotuned; the interpreter uses one fixed small config.
"""

import math

import torch
import triton
import triton.language as tl

from kernels._dispatch import triton_interpreter_active, use_triton
from kernels.rel_pos_bias import rel_pos_bias_ref, table_grad_from_dense, table_grad_plan

LOG2E = 1.4426950408889634
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}  # small tiles: several blocks and edge masks at test shapes


def rel_pos_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    scale: float | None = None,
    upcast: bool = True,
    reorder_ops: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference (flash-attn `attention_ref` style), float64-capable, materialises `[B, H, N, N]`.

    upcast: compute in fp32 (fp64 inputs stay fp64) and return in the input dtype; `upcast=False` keeps the input
    precision throughout (the "PyTorch low precision" baseline of the tests). reorder_ops: scale q before the
    matmul instead of scaling the scores, as a second low-precision ordering.
    """
    dtype_in = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    scores = (q * scale) @ k.transpose(-1, -2) if reorder_ops else (q @ k.transpose(-1, -2)) * scale  # [B, H, N, N]
    if bias_table is not None:
        scores = scores + rel_pos_bias_ref(bias_table, rel_index).to(scores.dtype)  # + [H, N, N]
    attn = scores.softmax(dim=-1)
    return (attn.to(v.dtype) @ v).to(dtype_in)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for half inputs


def _fwd_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64)
        for w in (4, 8)
        for s in (2, 3, 4)
        if not (bm == 128 and w == 4 and s == 4)
    ]


def _bwd_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (32, 64)
        for bn in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


@triton.jit
def _score_tile(
    q,  # [BLOCK_M, BLOCK_D] query tile
    k,  # [BLOCK_N, BLOCK_D] key tile
    TABLE,  # [R, H] bias table
    INDEX,  # [N, N] int32 rel index
    head,  # head of this program
    offs_m,  # [BLOCK_M] query positions
    offs_n,  # [BLOCK_N] key positions
    N,
    H,
    qk_scale,  # softmax scale · log2(e)
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of one tile in the log2 domain: (q kᵀ·scale + bias)·log2(e), `[BLOCK_M, BLOCK_N]` fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        in_tile = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        row = tl.load(INDEX + offs_m[:, None] * N + offs_n[None, :], mask=in_tile, other=0)  # [BLOCK_M, BLOCK_N]
        bias = tl.load(TABLE + row * H + head, mask=in_tile, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _fwd_kernel(
    Q,  # [B, H, N, D] queries
    K,  # [B, H, N, D] keys
    V,  # [B, H, N, D] values
    TABLE,  # [R, H] bias table (unused without HAS_BIAS)
    INDEX,  # [N, N] int32 rel index, contiguous (unused without HAS_BIAS)
    OUT,  # [B, H, N, D] output, contiguous
    LSE,  # [B*H, N] fp32 log2-domain row logsumexp (output)
    stride_qb, stride_qh, stride_qn,  # q strides (batch, head, token); unit stride in D
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N,  # heads, tokens
    qk_scale,  # softmax scale · log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // H
    head = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < N) & mask_d, other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < N) & mask_d
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _score_tile(q, k, TABLE, INDEX, head, offs_m, offs_n, N, H, qk_scale, HAS_BIAS, DOT_PRECISION)
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    out_ptrs = OUT + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < N) & mask_d)
    tl.store(LSE + pid_bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _bwd_preprocess_kernel(
    OUT,  # [B, H, N, D] forward output, contiguous
    DO,  # [B*H, N, D] output gradient, contiguous
    DELTA,  # [B*H, N] fp32 rowsum(O∘dO) (output)
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    offsets = pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * N + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V,  # [B, H, N, D] forward inputs
    TABLE,  # [R, H] bias table
    INDEX,  # [N, N] int32 rel index, contiguous
    DO,  # [B, H, N, D] output gradient, contiguous
    LSE,  # [B*H, N] fp32 log2-domain logsumexp from the forward
    DELTA,  # [B*H, N] fp32 rowsum(O∘dO)
    DK, DV,  # [B, H, N, D] key/value gradients (output), contiguous
    DTABLE,  # [R, H] fp32 table gradient, atomically accumulated (non-deterministic mode)
    DBIAS,  # [G, H, N, N] fp32 dense partial bias gradient owned per (group, head, key block) (deterministic mode)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    B, H, N,  # batch, heads, tokens
    GROUPS,  # G: batch groups; program (g, h) handles batches g, g+G, g+2G, ...
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale · log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program
):
    pid_n = tl.program_id(0)
    pid_gh = tl.program_id(1)
    group = pid_gh // H
    head = pid_gh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < N) & mask_d
    for batch in range(group, B, GROUPS):
        bh = batch * H + head
        k = tl.load(K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            valid_m = offs_m < N
            q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=valid_m[:, None] & mask_d, other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(DO + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                         mask=valid_m[:, None] & mask_d, other=0.0)
            lse = tl.load(LSE + bh * N + offs_m, mask=valid_m, other=0.0)  # [BLOCK_M]
            delta = tl.load(DELTA + bh * N + offs_m, mask=valid_m, other=0.0)
            s = _score_tile(q, k, TABLE, INDEX, head, offs_m, offs_n, N, H, qk_scale, HAS_BIAS, DOT_PRECISION)
            in_tile = valid_m[:, None] & (offs_n[None, :] < N)
            p = tl.where(in_tile, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N] probabilities
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])  # d loss / d (scaled score + bias)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                if DETERMINISTIC:
                    dbias_ptrs = DBIAS + (group * H + head) * N * N + offs_m[:, None] * N + offs_n[None, :]
                    tl.store(dbias_ptrs, tl.load(dbias_ptrs, mask=in_tile, other=0.0) + ds, mask=in_tile)
                else:
                    row = tl.load(INDEX + offs_m[:, None] * N + offs_n[None, :], mask=in_tile, other=0)
                    tl.atomic_add(DTABLE + row * H + head, ds, mask=in_tile)
        out_offsets = bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V,  # [B, H, N, D] forward inputs
    TABLE,  # [R, H] bias table
    INDEX,  # [N, N] int32 rel index, contiguous
    DO,  # [B, H, N, D] output gradient, contiguous
    LSE,  # [B*H, N] fp32 log2-domain logsumexp
    DELTA,  # [B*H, N] fp32 rowsum(O∘dO)
    DQ,  # [B, H, N, D] query gradient (output), contiguous
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N,
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale · log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // H
    head = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    valid_m = offs_m < N
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=valid_m[:, None] & mask_d, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=valid_m[:, None] & mask_d, other=0.0)
    lse = tl.load(LSE + pid_bh * N + offs_m, mask=valid_m, other=0.0)
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=valid_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < N) & mask_d
        k = tl.load(K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = _score_tile(q, k, TABLE, INDEX, head, offs_m, offs_n, N, H, qk_scale, HAS_BIAS, DOT_PRECISION)
        p = tl.where(valid_m[:, None] & (offs_n[None, :] < N), tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid_m[:, None] & mask_d)


_fwd_kernel_tuned = triton.autotune(_fwd_configs(), key=["N", "HEAD_DIM", "HAS_BIAS"])(_fwd_kernel)
_bwd_dkdv_kernel_tuned = triton.autotune(
    _bwd_configs(), key=["N", "HEAD_DIM", "HAS_BIAS", "DETERMINISTIC"], reset_to_zero=["DTABLE", "DBIAS"]
)(_bwd_dkdv_kernel)
_bwd_dq_kernel_tuned = triton.autotune(_fwd_configs(), key=["N", "HEAD_DIM", "HAS_BIAS"])(_bwd_dq_kernel)


def _pick(kernel, tuned, device: torch.device):
    """The autotuned kernel on CUDA; the plain kernel with fixed small tiles under the interpreter."""
    if device.type == "cuda" and not triton_interpreter_active():
        return tuned, {}
    return kernel, dict(_INTERPRETER_BLOCKS)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def rel_pos_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out `[B, H, N, D]` (contiguous, q's dtype) and lse `[B*H, N]` fp32."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty(batch, heads, tokens, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
    has_bias = bias_table is not None
    table = bias_table.contiguous() if has_bias else q  # dummy pointer when there is no bias
    index = rel_index.to(torch.int32).contiguous() if has_bias else q
    kernel, blocks = _pick(_fwd_kernel, _fwd_kernel_tuned, q.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel[grid](
        q, k, v, table, index, out, lse, *_strides(q), *_strides(k), *_strides(v), heads, tokens, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), HAS_BIAS=has_bias, DOT_PRECISION=_dot_precision(q.dtype),
        **blocks,
    )
    return out, lse


def _batch_groups(batch: int, heads: int, tokens: int) -> int:
    """Batch groups G for the deterministic dK/dV pass: enough programs to fill ~264 SMs' worth of work."""
    key_blocks = triton.cdiv(tokens, 64)
    return max(1, min(batch, triton.cdiv(264, key_blocks * heads)))


def rel_pos_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Returns dq, dk, dv `[B, H, N, D]` and the fp32 table gradient `[R, H]`
    (an empty tensor when there is no table)."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    batch, heads, tokens, head_dim = q.shape
    grad_out = grad_out.contiguous()
    block_d = _block_d(head_dim)
    delta = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
    _bwd_preprocess_kernel[(triton.cdiv(tokens, 32), batch * heads)](
        out, grad_out, delta, tokens, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=32
    )
    dq, dk, dv = (torch.empty(batch, heads, tokens, head_dim, device=q.device, dtype=q.dtype) for _ in range(3))
    has_bias = bias_table is not None
    table = bias_table.contiguous() if has_bias else q
    index = rel_index.to(torch.int32).contiguous() if has_bias else q
    groups = _batch_groups(batch, heads, tokens) if deterministic and has_bias else batch
    num_rows = bias_table.shape[0] if has_bias else 0
    dtable = torch.zeros(num_rows, heads, device=q.device, dtype=torch.float32)
    dense_shape = (groups, heads, tokens, tokens) if deterministic and has_bias else (1,)
    dbias = torch.zeros(dense_shape, device=q.device, dtype=torch.float32)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_BIAS=has_bias, DOT_PRECISION=_dot_precision(q.dtype))
    strides = (*_strides(q), *_strides(k), *_strides(v))

    kernel, blocks = _pick(_bwd_dkdv_kernel, _bwd_dkdv_kernel_tuned, q.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_N"]), groups * heads)  # noqa: E731
    kernel[grid](
        q, k, v, table, index, grad_out, lse, delta, dk, dv, dtable, dbias, *strides,
        batch, heads, tokens, groups, scale, scale * LOG2E, DETERMINISTIC=deterministic, **common, **blocks,
    )
    kernel, blocks = _pick(_bwd_dq_kernel, _bwd_dq_kernel_tuned, q.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel[grid](
        q, k, v, table, index, grad_out, lse, delta, dq, *strides, heads, tokens, scale, scale * LOG2E,
        **common, **blocks,
    )
    if has_bias and deterministic:
        dtable = table_grad_from_dense(dbias.sum(dim=0), table_grad_plan(rel_index, num_rows))
    return dq, dk, dv, dtable


# torch.library custom ops: opaque to torch.compile (fake kernels give shapes), differentiated by the Function below.
@torch.library.custom_op("kernels::rel_pos_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rel_pos_attention_forward(q, k, v, bias_table, rel_index, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, bias_table, rel_index, scale):
    batch, heads, tokens, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch * heads, tokens), dtype=torch.float32)


@torch.library.custom_op("kernels::rel_pos_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return rel_pos_attention_backward(grad_out, q, k, v, out, lse, bias_table, rel_index, scale, deterministic)


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, bias_table, rel_index, scale, deterministic):
    table_shape = (bias_table.shape[0] if bias_table is not None else 0, q.shape[1])
    dtable = q.new_empty(table_shape, dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtable


class RelPosAttentionFunction(torch.autograd.Function):
    """Autograd over the custom ops: saves q, k, v, out and the fp32 logsumexp (O(B·H·N) extra, no N² buffer)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_table, rel_index, scale: float, deterministic: bool):
        out, lse = torch.ops.kernels.rel_pos_attention_fwd(q, k, v, bias_table, rel_index, scale)
        ctx.save_for_backward(q, k, v, out, lse, bias_table, rel_index)
        ctx.scale = scale
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias_table, rel_index = ctx.saved_tensors
        dq, dk, dv, dtable = torch.ops.kernels.rel_pos_attention_bwd(
            grad_out, q, k, v, out, lse, bias_table, rel_index, ctx.scale, ctx.deterministic
        )
        dtable = dtable.to(bias_table.dtype) if bias_table is not None else None
        return dq, dk, dv, dtable, None, None, None


def _check_inputs(q, k, v, bias_table, rel_index) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype among fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported (register pressure); split heads")
    if bias_table is None:
        return
    batch, heads, tokens, _ = q.shape
    if rel_index is None:
        raise ValueError("bias_table was given without rel_index; pass the [N, N] index or neither")
    if bias_table.dim() != 2 or bias_table.shape[1] != heads:
        raise ValueError(f"bias_table must be [R, H={heads}], got {tuple(bias_table.shape)}")
    if tuple(rel_index.shape) != (tokens, tokens) or rel_index.dtype.is_floating_point:
        raise ValueError(f"rel_index must be an integer [N, N] = [{tokens}, {tokens}] tensor, "
                         f"got {rel_index.dtype} {tuple(rel_index.shape)}")


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    scale: float | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias_table[rel_index].permute(2, 0, 1)) v → `[B, H, N, D]`.

    q, k, v `[B, H, N, D]` (fp32/fp16/bf16); bias_table `[R, H]` (learnable, any float dtype) or None for plain
    attention; rel_index `[N, N]` integer in `[0, R)`; scale defaults to `D ** -0.5`. Differentiable in q, k, v and
    the table. deterministic: bitwise-reproducible table gradient (slower, see module docstring); None follows
    `torch.are_deterministic_algorithms_enabled()`. The default table gradient uses fp32 atomics: NOT deterministic.
    CPU tensors without `TRITON_INTERPRET=1` run `rel_pos_attention_ref` (materialises `[B, H, N, N]`).
    """
    _check_inputs(q, k, v, bias_table, rel_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not use_triton("rel_pos_attention", q):
        return rel_pos_attention_ref(q, k, v, bias_table, rel_index, scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return RelPosAttentionFunction.apply(q, k, v, bias_table, rel_index, scale, deterministic)

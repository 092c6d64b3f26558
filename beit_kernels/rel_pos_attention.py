"""Attention with a learnable relative position bias, FlashAttention-style (no `[B, H, N, N]` tensor in memory).

    out = softmax(q kᵀ·scale + bias) v,   bias = bias_table[rel_index].permute(2, 0, 1)   q, k, v, out: [B, H, N, D]

The `[H, N, N]` bias (shared by every batch element; 1.2 MB in bf16 for BEiT-L) is gathered from the `[R, H]` table
once per call by `beit_kernels.rel_pos_bias`'s gather kernel, so each score tile costs the kernels one coalesced load
instead of an index load plus a dependent strided gather.
Forward: online softmax in the exp2 domain over key blocks; saves the log2-domain row logsumexp `[B*H, N]` (fp32).
Backward: Δ = rowsum(O∘dO); a dK/dV kernel per key block and a dQ kernel per query block, both recomputing P from the
saved logsumexp. The bias gradient is reduced over the batch without atomics, in the dQ kernel (whose `[BLOCK_M, D]`
state leaves registers to spare, where the dK/dV kernel's `[BLOCK_N, D]` k, v, dk, dv do not): the dQ program of
(query block, head, batch group g) walks batches g, g+G, g+2G, ... and keeps their dS sum in a dense fp32 partial
`[G, H, N, N]` it alone owns (the first batch stores, later ones add; G is chosen from the device's SM count for ~2
waves: ≤ 20 MB for BEiT-L at 224 px, 43 MB at 384). The G partials are summed, then the table gradient is the
fixed-order segment sum of `beit_kernels.rel_pos_bias` (`table_grad_from_dense`). Every path is deterministic: bitwise
repeatable for a given autotuned config and G (the tuning cache on disk keeps the config from run to run).

Layers: `_fwd_kernel`, `_bwd_preprocess_kernel`, `_bwd_dkdv_kernel`, `_bwd_dq_kernel` → launchers
`rel_pos_attention_forward` / `rel_pos_attention_backward` (registered as torch.library custom ops so torch.compile
treats them as opaque) → `RelPosAttentionFunction` → `rel_pos_attention`; `rel_pos_attention_ref` is the oracle.

Limits: head dim D ≤ 256 (the D block is padded to the next power of two ≥ 16 with masks; fast path D = 64);
any N ≥ 1 (tiles are masked at the edges); q, k, v must share dtype (fp32, fp16 or bf16) and have a unit stride in
the last dim; bias_table `[R, H]` of any float dtype (the bias keeps it; gradients accumulated in fp32); rel_index
`[N, N]` integer in `[0, R)` (not range-checked on device; int32 avoids a conversion per call). fp32 inputs use
IEEE fp32 dot products (no TF32). Offsets into q/k/v/out and the gradient buffers are 64-bit (batch × stride and
(batch·H + head) × N × D pass 2³¹ at large batch × long sequences).
Dispatch: Triton for CUDA tensors or under `TRITON_INTERPRET=1`; a CPU tensor otherwise is an error naming the fix,
never a silent reference (`beit_kernels._dispatch`). CUDA configs are autotuned over the configs that compile without
register spills on the running arch (`python -m tools.aot` checks them); the interpreter uses one fixed small config.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from beit_kernels._dispatch import require_triton_on, triton_interpreter_active
from beit_kernels.rel_pos_bias import (
    TableGradPlan,
    rel_pos_bias_forward,
    rel_pos_bias_ref,
    table_grad_from_dense,
    table_grad_plan,
)

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


def dot_precision(is_fp32: bool) -> str:
    """The kernels' `DOT_PRECISION`: exact fp32 products for fp32 inputs (tf32 is ignored for half inputs)."""
    return "ieee" if is_fp32 else "tf32"


def block_d(head_dim: int) -> int:
    """The kernels' `BLOCK_D`: the head dim padded to a power of two of at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _fwd_configs() -> list[triton.Config]:
    """Candidates of the query-block kernels (forward and dQ): what `python -m tools.aot --subset=full` sweeps."""
    large = [_config(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3, 4)
             if not (bm == 128 and w == 4 and s == 4)]
    return large + [_config(32, bn, 4, s) for bn in (32, 64) for s in (2, 3)]  # small tiles for D = 128


def _bwd_configs() -> list[triton.Config]:
    """Candidates of the key-block kernel (dK/dV)."""
    return [_config(bm, bn, w, s) for bm in (32, 64) for bn in (64, 128) for w in (4, 8) for s in (2, 3)]


# What each kernel autotunes, per arch and head-dim block: the candidates that compile with no register spill and
# within shared memory under Triton 3.6 and 3.9, for bf16 and fp16 inputs, with no bias and with a bf16 or fp32 bias
# (chosen from the sweeps in benchmarks/results/aot/; `python -m tools.aot` fails if one of them spills).
# (BLOCK_M, BLOCK_N, warps, stages). Other archs (sm_86/89, sm_100) take the sm_80 lists; there a config above the
# card's shared memory (sm_86/89: ~99 KB) fails to launch and the autotuner skips it. fp32 inputs take the same
# lists (they may spill there: fp32 is the tests' path, not the training one).
TUNED_CONFIGS: dict[tuple[str, int, int], list[tuple[int, int, int, int]]] = {
    ("_fwd_kernel", 80, 64): [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3),
                              (128, 64, 8, 2), (128, 64, 8, 3)],
    ("_fwd_kernel", 90, 64): [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3),
                              (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4)],
    ("_fwd_kernel", 80, 128): [(64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3)],
    ("_fwd_kernel", 90, 128): [(64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 2),
                               (128, 32, 8, 3)],
    # sm_80 3-stage dK/dV at D=64 and 4-stage dQ at D=128 are clean under Triton 3.9 but spill 8-16 B under 3.6
    ("_bwd_dkdv_kernel", 80, 64): [(32, 64, 4, 2), (32, 64, 8, 2)],
    ("_bwd_dkdv_kernel", 90, 64): [(32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2),
                                   (32, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3)],
    ("_bwd_dkdv_kernel", 80, 128): [(32, 64, 8, 2), (32, 64, 8, 3)],
    ("_bwd_dkdv_kernel", 90, 128): [(32, 64, 8, 2), (32, 64, 8, 3)],
    ("_bwd_dq_kernel", 80, 128): [(64, 32, 8, 2), (64, 32, 8, 3)],
    ("_bwd_dq_kernel", 90, 128): [(32, 32, 4, 3)],  # the only candidate with no spill under an fp32 bias
    ("_bwd_dq_kernel", 80, 64): [(64, 32, 8, 2), (64, 32, 8, 3), (64, 32, 8, 4)],
    ("_bwd_dq_kernel", 90, 64): [(64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 32, 8, 4), (64, 64, 8, 2),
                                 (64, 64, 8, 3), (128, 32, 8, 2)],
}


def _arch_family(capability: tuple[int, int]) -> int:
    return 90 if capability[0] == 9 else 80


def aot_configs(kernel: str, arch: int, head_dim: int) -> list[triton.Config] | None:
    """The configs `kernel` autotunes on `arch` (80 or 90) at `head_dim`; None for kernels that are not tuned."""
    if not kernel.startswith(("_fwd", "_bwd_dkdv", "_bwd_dq")):
        return None
    head_dim_block = 64 if head_dim <= 64 else 128  # D ≤ 64 pads to at most 64; 129..256 use the D=128 lists
    return [_config(*config) for config in TUNED_CONFIGS[(kernel, arch, head_dim_block)]]


def _prune_to_arch(kernel: str):
    """`early_config_prune` of the autotuner: keep the spill-free configs of the running arch and head dim, so no
    rank times configs that spill (or fail) there."""
    def prune(configs, named_args, **kwargs):
        keep = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in aot_configs(kernel, _arch_family(torch.cuda.get_device_capability()), kwargs["HEAD_DIM"])}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return prune


def _autotuned(kernel, candidates: list[triton.Config]):
    """`kernel` autotuned over `candidates` pruned to its arch's list, keyed by shape, with its choice cached on
    disk (Triton's cache directory), so a rerun or another rank on the same machine does not tune again."""
    return triton.autotune(candidates, key=["N", "HEAD_DIM", "HAS_BIAS"], cache_results=True,
                           prune_configs_by={"early_config_prune": _prune_to_arch(kernel.__name__)})(kernel)


@triton.jit
def _score_tile(
    q,  # [BLOCK_M, BLOCK_D] query tile
    k,  # [BLOCK_N, BLOCK_D] key tile
    BIAS_HEAD,  # [N, N] this head's bias, contiguous
    offs_m,  # [BLOCK_M] query positions
    offs_n,  # [BLOCK_N] key positions
    N,
    qk_scale,  # softmax scale · log2(e)
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of one tile in the log2 domain: (q kᵀ·scale + bias)·log2(e), `[BLOCK_M, BLOCK_N]` fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        in_tile = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        bias = tl.load(BIAS_HEAD + offs_m[:, None] * N + offs_n[None, :], mask=in_tile, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _fwd_kernel(
    Q,  # [B, H, N, D] queries
    K,  # [B, H, N, D] keys
    V,  # [B, H, N, D] values
    BIAS,  # [H, N, N] bias, contiguous (unused without HAS_BIAS)
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
    bh = tl.program_id(1).to(tl.int64)  # 64-bit: bh·N·D and batch·stride pass 2³¹ on large inputs
    batch = bh // H
    head = bh % H
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
    bias_head = BIAS + head * N * N
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < N) & mask_d
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _score_tile(q, k, bias_head, offs_m, offs_n, N, qk_scale, HAS_BIAS, DOT_PRECISION)
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    out_ptrs = OUT + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < N) & mask_d)
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


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
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    offsets = bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V,  # [B, H, N, D] forward inputs
    BIAS,  # [H, N, N] bias, contiguous
    DO,  # [B, H, N, D] output gradient, contiguous
    LSE,  # [B*H, N] fp32 log2-domain logsumexp from the forward
    DELTA,  # [B*H, N] fp32 rowsum(O∘dO)
    DK, DV,  # [B, H, N, D] key/value gradients (output), contiguous
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N,  # heads, tokens
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale · log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // H
    head = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < N) & mask_d
    k = tl.load(K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    bias_head = BIAS + head * N * N
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
        s = _score_tile(q, k, bias_head, offs_m, offs_n, N, qk_scale, HAS_BIAS, DOT_PRECISION)
        p = tl.where(valid_m[:, None] & (offs_n[None, :] < N), tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])  # d loss / d (scaled score + bias)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out_offsets = bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V,  # [B, H, N, D] forward inputs
    BIAS,  # [H, N, N] bias, contiguous
    DO,  # [B, H, N, D] output gradient, contiguous
    LSE,  # [B*H, N] fp32 log2-domain logsumexp
    DELTA,  # [B*H, N] fp32 rowsum(O∘dO)
    DQ,  # [B, H, N, D] query gradient (output), contiguous
    DBIAS,  # [G, H, N, N] fp32 bias gradient summed over the batches of each group (output, every element written)
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
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    pid_m = tl.program_id(0)
    pid_gh = tl.program_id(1).to(tl.int64)
    group = pid_gh // H
    head = pid_gh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    valid_m = offs_m < N
    bias_head = BIAS + head * N * N
    dbias_group = DBIAS + pid_gh * N * N  # [N, N] slice owned by (group, head): no other program touches it
    for batch in range(group, B, GROUPS):
        bh = batch * H + head
        q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=valid_m[:, None] & mask_d, other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(DO + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=valid_m[:, None] & mask_d, other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=valid_m, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=valid_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n[:, None] < N) & mask_d
            k = tl.load(K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = _score_tile(q, k, bias_head, offs_m, offs_n, N, qk_scale, HAS_BIAS, DOT_PRECISION)
            in_tile = valid_m[:, None] & (offs_n[None, :] < N)
            p = tl.where(in_tile, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N] d loss / d (scaled score + bias)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                dbias_ptrs = dbias_group + offs_m[:, None] * N + offs_n[None, :]
                if batch != group:  # later batches of the group add to what the first one stored
                    ds += tl.load(dbias_ptrs, mask=in_tile, other=0.0)
                tl.store(dbias_ptrs, ds, mask=in_tile)
        tl.store(DQ + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid_m[:, None] & mask_d)


_fwd_kernel_tuned = _autotuned(_fwd_kernel, _fwd_configs())
_bwd_dkdv_kernel_tuned = _autotuned(_bwd_dkdv_kernel, _bwd_configs())
_bwd_dq_kernel_tuned = _autotuned(_bwd_dq_kernel, _fwd_configs())


def _pick(kernel, tuned, device: torch.device):
    """The autotuned kernel on CUDA; the plain kernel with fixed small tiles under the interpreter."""
    if device.type == "cuda" and not triton_interpreter_active():
        return tuned, {}
    return kernel, dict(_INTERPRETER_BLOCKS)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _gathered_bias(bias_table: torch.Tensor | None, rel_index: torch.Tensor | None, like: torch.Tensor
                   ) -> torch.Tensor:
    """`[H, N, N]` bias in the table's dtype (Triton gather), or `like` as a dummy pointer when there is no table."""
    return rel_pos_bias_forward(bias_table, rel_index) if bias_table is not None else like


# The launchers are torch.library custom ops: opaque to torch.compile (the fake kernels give shapes), differentiated by
# RelPosAttentionFunction below.
@torch.library.custom_op("beit_kernels::rel_pos_attention_fwd", mutates_args=())
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
    bias = _gathered_bias(bias_table, rel_index, q)
    kernel, blocks = _pick(_fwd_kernel, _fwd_kernel_tuned, q.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kernel[grid](
        q, k, v, bias, out, lse, *_strides(q), *_strides(k), *_strides(v), heads, tokens, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), HAS_BIAS=bias_table is not None,
        DOT_PRECISION=dot_precision(q.dtype == torch.float32), **blocks,
    )
    return out, lse


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (H200: 132, A100: 108); 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def batch_groups(batch: int, heads: int, tokens: int, sm_count: int) -> int:
    """Batch groups G of the dQ pass with a bias: enough programs (query blocks × heads × G) for ~2 waves on
    `sm_count` multiprocessors, and no more, since the `[G, H, N, N]` fp32 partial grows with G. G is fixed before
    the autotuner picks BLOCK_M, so it counts 64-row query blocks, the size of most tuned dQ configs; sm_90's one
    D=128 config (32 rows) runs twice the programs, ~4 waves."""
    query_blocks = triton.cdiv(tokens, 64)
    return max(1, min(batch, triton.cdiv(2 * sm_count, query_blocks * heads)))


@torch.library.custom_op("beit_kernels::rel_pos_attention_bwd", mutates_args=())
def rel_pos_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias_table: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    plan_order: torch.Tensor | None,
    plan_offsets: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Returns dq, dk, dv `[B, H, N, D]` and the fp32 table gradient `[R, H]`
    (an empty tensor when there is no table). plan_order/plan_offsets: `table_grad_plan(rel_index, R)`."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    batch, heads, tokens, head_dim = q.shape
    grad_out = grad_out.contiguous()
    padded_d = block_d(head_dim)
    delta = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
    _bwd_preprocess_kernel[(triton.cdiv(tokens, 32), batch * heads)](
        out, grad_out, delta, tokens, HEAD_DIM=head_dim, BLOCK_D=padded_d, BLOCK_M=32
    )
    dq, dk, dv = (torch.empty(batch, heads, tokens, head_dim, device=q.device, dtype=q.dtype) for _ in range(3))
    has_bias = bias_table is not None
    bias = _gathered_bias(bias_table, rel_index, q)
    groups = batch_groups(batch, heads, tokens, device_sm_count(q.device)) if has_bias else batch
    dbias = torch.empty((groups, heads, tokens, tokens) if has_bias else (1,), device=q.device, dtype=torch.float32)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=padded_d, HAS_BIAS=has_bias,
                  DOT_PRECISION=dot_precision(q.dtype == torch.float32))
    strides = (*_strides(q), *_strides(k), *_strides(v))

    kernel, blocks = _pick(_bwd_dkdv_kernel, _bwd_dkdv_kernel_tuned, q.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    kernel[grid](
        q, k, v, bias, grad_out, lse, delta, dk, dv, *strides, heads, tokens, scale, scale * LOG2E, **common, **blocks,
    )
    kernel, blocks = _pick(_bwd_dq_kernel, _bwd_dq_kernel_tuned, q.device)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), groups * heads)  # noqa: E731
    kernel[grid](
        q, k, v, bias, grad_out, lse, delta, dq, dbias, *strides, batch, heads, tokens, groups, scale, scale * LOG2E,
        **common, **blocks,
    )
    if not has_bias:
        return dq, dk, dv, torch.zeros(0, heads, device=q.device, dtype=torch.float32)
    plan = TableGradPlan(plan_order, plan_offsets)
    return dq, dk, dv, table_grad_from_dense(dbias.sum(dim=0), plan)  # [G, H, N, N] → [H, N, N] → [R, H]


@rel_pos_attention_forward.register_fake
def _fwd_fake(q, k, v, *_):
    batch, heads, tokens, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch * heads, tokens), dtype=torch.float32)


@rel_pos_attention_backward.register_fake
def _bwd_fake(grad_out, q, *args):
    bias_table = args[4]  # after k, v, out, lse
    dtable = q.new_empty((bias_table.shape[0] if bias_table is not None else 0, q.shape[1]), dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtable


class RelPosAttentionFunction(torch.autograd.Function):
    """Autograd over the custom ops: saves q, k, v, out and the fp32 logsumexp (O(B·H·N) extra, no N² buffer; the
    backward gathers the `[H, N, N]` bias again, a few microseconds, rather than keeping it alive)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_table, rel_index, plan_order, plan_offsets, scale: float):
        out, lse = rel_pos_attention_forward(q, k, v, bias_table, rel_index, scale)
        ctx.save_for_backward(q, k, v, out, lse, bias_table, rel_index, plan_order, plan_offsets)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias_table, rel_index, plan_order, plan_offsets = ctx.saved_tensors
        dq, dk, dv, dtable = rel_pos_attention_backward(grad_out, q, k, v, out, lse, bias_table, rel_index,
                                                        plan_order, plan_offsets, ctx.scale)
        dtable = dtable.to(bias_table.dtype) if bias_table is not None else None
        return dq, dk, dv, dtable, None, None, None, None


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
    plan: TableGradPlan | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias_table[rel_index].permute(2, 0, 1)) v → `[B, H, N, D]`.

    q, k, v `[B, H, N, D]` (fp32/fp16/bf16); bias_table `[R, H]` (learnable, any float dtype) or None for plain
    attention; rel_index `[N, N]` integer in `[0, R)` (int32 spares a conversion per call); scale defaults to
    `D ** -0.5`. Differentiable in q, k, v and the table; the table gradient is deterministic (no atomics).
    `plan` (`beit_kernels.rel_pos_bias.table_grad_plan(rel_index, R)`, built once per index) spares each backward a
    sort.
    Triton kernels only: CPU tensors without `TRITON_INTERPRET=1` raise (the CPU path is `rel_pos_attention_ref`).
    """
    _check_inputs(q, k, v, bias_table, rel_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    require_triton_on("rel_pos_attention", q)
    if bias_table is not None and plan is None:
        plan = table_grad_plan(rel_index, bias_table.shape[0])
    order, offsets = plan if plan is not None else (None, None)
    return RelPosAttentionFunction.apply(q, k, v, bias_table, rel_index, order, offsets, scale)

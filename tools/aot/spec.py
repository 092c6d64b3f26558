"""The spec of every kernel the check compiles (signature, constexprs, configs, variant axes) and one compile's
variant."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from beit_kernels.rel_pos_attention import block_d, dot_precision

# ---------------------------------------------------------------------------------------------------------------
# The spec: one row per kernel. Adjust it here when a kernel's signature, launcher meta-parameters or configs change.
# Argument types (non-constexpr arguments, in the kernel's order):
#   *x    pointer to the q/k/v (input) dtype
#   *t    pointer to the bias-table dtype: the gathered [H, N, N] bias keeps the table's dtype (the input dtype
#         when there is no bias: the launchers pass q as a dummy pointer)
#   *fp32 *i32 *i64  fixed pointer types     i32/16  int32 that is a multiple of 16     i32  plain int32
#   fp32  float scalar
# constexprs: name -> value, or a function of the Variant. configs: a zero-argument function of the kernel's module
# returning its autotune candidates; None = the one launch `fixed` describes (meta-parameters the launcher passes,
# num_warps/num_stages = Triton's launch defaults 4/3 unless the launcher sets them).
# axes: which variant axes the kernel has: head_dim, bias (has_bias × table dtype).
# ---------------------------------------------------------------------------------------------------------------

_STRIDES = "stride_qb:i32/16 stride_qh:i32/16 stride_qn:i32/16 stride_kb:i32/16 stride_kh:i32/16 stride_kn:i32/16 " \
           "stride_vb:i32/16 stride_vh:i32/16 stride_vn:i32/16"


_ATTENTION_CONSTEXPRS = {
    "HEAD_DIM": lambda v: v.head_dim,
    "BLOCK_D": lambda v: block_d(v.head_dim),
    "HAS_BIAS": lambda v: v.has_bias,
    "DOT_PRECISION": lambda v: dot_precision(v.dtype == "fp32"),
}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    module: str
    args: str
    constexprs: dict
    configs: str | None = None  # name of the module's candidate-config function
    fixed: dict = dataclasses.field(default_factory=dict)  # meta-parameters of a fixed launch (configs=None)
    num_warps: int = 4
    num_stages: int = 3
    axes: frozenset = frozenset()
    extra_dtypes: tuple[str, ...] = ()  # element dtypes swept besides the --dtypes list


SPECS: dict[str, KernelSpec] = {
    "_fwd_kernel": KernelSpec(
        "beit_kernels.rel_pos_attention",
        f"Q:*x K:*x V:*x BIAS:*t OUT:*x LSE:*fp32 {_STRIDES} H:i32 N:i32 qk_scale:fp32",
        _ATTENTION_CONSTEXPRS, configs="_fwd_configs", axes=frozenset({"head_dim", "bias"}),
    ),
    "_bwd_preprocess_kernel": KernelSpec(
        "beit_kernels.rel_pos_attention", "OUT:*x DO:*x DELTA:*fp32 N:i32",
        {"HEAD_DIM": lambda v: v.head_dim, "BLOCK_D": lambda v: block_d(v.head_dim)},
        fixed={"BLOCK_M": 32}, axes=frozenset({"head_dim"}),
    ),
    "_bwd_dkdv_kernel": KernelSpec(
        "beit_kernels.rel_pos_attention",
        f"Q:*x K:*x V:*x BIAS:*t DO:*x LSE:*fp32 DELTA:*fp32 DK:*x DV:*x {_STRIDES} H:i32 N:i32 "
        "sm_scale:fp32 qk_scale:fp32",
        _ATTENTION_CONSTEXPRS, configs="_bwd_configs", axes=frozenset({"head_dim", "bias"}),
    ),
    "_bwd_dq_kernel": KernelSpec(
        "beit_kernels.rel_pos_attention",
        "Q:*x K:*x V:*x BIAS:*t DO:*x LSE:*fp32 DELTA:*fp32 DQ:*x DBIAS:*fp32 "
        f"{_STRIDES} B:i32 H:i32 N:i32 GROUPS:i32 sm_scale:fp32 qk_scale:fp32",
        _ATTENTION_CONSTEXPRS, configs="_fwd_configs", axes=frozenset({"head_dim", "bias"}),
    ),
    # The table's own dtype: bf16/fp16 under pure half precision, fp32 for an fp32 parameter under autocast.
    "_rel_pos_bias_fwd_kernel": KernelSpec(
        "beit_kernels.rel_pos_bias", "TABLE:*x INDEX:*i32 OUT:*x H:i32 P:i32", {}, fixed={"BLOCK_P": 1024},
        extra_dtypes=("fp32",),
    ),
    # DENSE is the bias gradient: the table's dtype from rel_pos_bias, fp32 from the attention backward.
    # BLOCK_H = next power of two ≥ H: 16 for BEiT-B (12 heads) and BEiT-L (16 heads).
    "_table_grad_kernel": KernelSpec(
        "beit_kernels.rel_pos_bias", "DENSE:*x ORDER:*i32 OFFSETS:*i32 DTABLE:*fp32 H:i32 P:i32", {},
        fixed={"BLOCK_J": 64, "BLOCK_H": 16}, extra_dtypes=("fp32",),
    ),
    # LOGITS in the compute dtype; V = 8192 (the DALL-E tokenizer) makes stride_row, V and row_start multiples of 16
    # and BLOCK_V = min(4096, next_pow2(V)) = 4096.
    "_cross_entropy_kernel": KernelSpec(
        "beit_kernels.masked_lm_loss",
        "LOGITS:*x stride_row:i32/16 LABELS:*i64 COUNT:*i64 LOSS:*fp32 CORRECT:*fp32 row_start:i32/16 V:i32/16",
        {}, fixed={"BLOCK_V": 4096},
    ),
}

# Shared memory one block may use with the opt-in attribute (CUDA programming guide, compute capabilities table).
SMEM_LIMITS = {80: 166912, 90: 232448}
ALL_DTYPES = ("bf16", "fp16")
TABLE_DTYPES = ("same", "fp32")  # the table in the input dtype (pure bf16/fp16), or an fp32 parameter (autocast)
DEFAULT_OUT = Path("build/aot")  # git-ignored; committed tables are written on purpose (--out=benchmarks/results/aot)
HOOK_NAME = "aot_configs"
TASKS_PER_WORKER = 200  # compiles per worker process before a fresh one (memory; ~2% of the time in imports)


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile: a kernel at one arch, dtype, shape and config. Plain data so it crosses process boundaries."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int | None
    has_bias: bool | None
    table_dtype: str | None  # resolved ("bf16", "fp32", ...) or None when the kernel has no table
    meta: tuple[tuple[str, int], ...]  # config meta-parameters (BLOCK_M, ...), sorted
    num_warps: int
    num_stages: int
    num_ctas: int = 1
    maxnreg: int | None = None
    candidate: bool = True  # in the kernel's candidate list (autotune configs) or its fixed launch
    pruned: bool = True  # in the kernel's pruned list (the configs it autotunes on this arch)

    def config_label(self) -> str:
        meta = " ".join(f"{key}={value}" for key, value in self.meta)
        return f"{meta} w{self.num_warps} s{self.num_stages}"


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " | ".join(lines[:3]) if lines else ""
    return f"{type(error).__name__}: {text}"[:400]

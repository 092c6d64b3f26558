"""Ahead-of-time compile check of the project's Triton kernels for sm_80 (A100) and sm_90 (H100/H200), no GPU needed.

    python -m kernels.aot [--subset=ci|full] [--arch=80,90] [--head-dims=64,128] [--dtypes=bf16,fp16]
                          [--kernels=_fwd_kernel,...] [--jobs=N] [--out=build/aot/] [--cache-dir=DIR]
    python -m kernels.aot --check-launchers     # only: does SPECS match what the launchers pass Triton? (seconds)
    python -m kernels.aot --compare A.jsonl B.jsonl   # only: variants usable in one result file and not the other
                                                      # (exit status 1 when there is one)

Each variant goes through the full Triton pipeline (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`) down to a cubin made by the `ptxas` bundled in Triton's wheel, in a throwaway `TRITON_CACHE_DIR` (so every
number is a real compile). Per variant it records registers per thread and spills (from ptxas' `-v` log, which
Triton prints when `knobs.nvidia.dump_ptxas_log` is on), shared memory (`metadata.shared`) against the arch's
opt-in per-block limit, and the compile time. Writes `aot_triton-<version>.jsonl` and `.md` under `--out`.

Fails (exit status 1, one line per failure) on: a compile error; shared memory above the arch limit in a config of
the pruned list (a candidate that overflows is only reported: the tuned list leaves it out); a group
(kernel, arch, dtype, head dim, has_bias, table dtype) with no spill-free config; and any config of
the kernel's pruned list that spills. The pruned list is what a kernel module's optional hook returns:

    def aot_configs(kernel: str, arch: int, head_dim: int) -> list[triton.Config] | None

(`kernel` is the kernel's name, e.g. "_bwd_dkdv_kernel"; None = no pruning for that kernel). Without the hook the
pruned list is the full candidate list, so every candidate config must be spill-free. `--subset=ci` compiles only
the pruned lists (without a hook: every candidate) for D=64, bf16; `--subset=full` compiles every candidate.

Specialisation model: Triton's launcher marks a pointer argument `tt.divisibility=16` when its address is 16-byte
aligned and an integer when it is a multiple of 16 (1 would become a constant). The spec below uses the realistic
case of the BEiT shapes: every pointer aligned (fresh torch allocations, and q/k/v slices of a qkv projection sit at
offsets of H·D elements), the strides of `[B, H, N, D]` tensors with D = 64 or 128 all multiples of 16 (`i32/16`),
and N = 197, H, B and group counts plain `i32` (BEiT-L's H = 16 would be specialised too; it only feeds index math).
`--check-launchers` verifies this model: it runs the real launchers on CPU tensors of BEiT-B's shapes under a
stand-in driver, records the signature Triton specialises for each kernel, and compares it with SPECS.
Spill counts are ptxas' "bytes spill stores/loads"; `n_spills` is what `CompiledKernel.n_spills` reports on a GPU
(the function's local memory in 4-byte words).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.rel_pos_attention import block_d, dot_precision

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
        "kernels.rel_pos_attention",
        f"Q:*x K:*x V:*x BIAS:*t OUT:*x LSE:*fp32 {_STRIDES} H:i32 N:i32 qk_scale:fp32",
        _ATTENTION_CONSTEXPRS, configs="_fwd_configs", axes=frozenset({"head_dim", "bias"}),
    ),
    "_bwd_preprocess_kernel": KernelSpec(
        "kernels.rel_pos_attention", "OUT:*x DO:*x DELTA:*fp32 N:i32",
        {"HEAD_DIM": lambda v: v.head_dim, "BLOCK_D": lambda v: block_d(v.head_dim)},
        fixed={"BLOCK_M": 32}, axes=frozenset({"head_dim"}),
    ),
    "_bwd_dkdv_kernel": KernelSpec(
        "kernels.rel_pos_attention",
        f"Q:*x K:*x V:*x BIAS:*t DO:*x LSE:*fp32 DELTA:*fp32 DK:*x DV:*x {_STRIDES} H:i32 N:i32 "
        "sm_scale:fp32 qk_scale:fp32",
        _ATTENTION_CONSTEXPRS, configs="_bwd_configs", axes=frozenset({"head_dim", "bias"}),
    ),
    "_bwd_dq_kernel": KernelSpec(
        "kernels.rel_pos_attention",
        "Q:*x K:*x V:*x BIAS:*t DO:*x LSE:*fp32 DELTA:*fp32 DQ:*x DBIAS:*fp32 "
        f"{_STRIDES} B:i32 H:i32 N:i32 GROUPS:i32 sm_scale:fp32 qk_scale:fp32",
        _ATTENTION_CONSTEXPRS, configs="_fwd_configs", axes=frozenset({"head_dim", "bias"}),
    ),
    # The table's own dtype: bf16/fp16 under pure half precision, fp32 for an fp32 parameter under autocast.
    "_rel_pos_bias_fwd_kernel": KernelSpec(
        "kernels.rel_pos_bias", "TABLE:*x INDEX:*i32 OUT:*x H:i32 P:i32", {}, fixed={"BLOCK_P": 1024},
        extra_dtypes=("fp32",),
    ),
    # DENSE is the bias gradient: the table's dtype from rel_pos_bias, fp32 from the attention backward.
    # BLOCK_H = next power of two ≥ H: 16 for BEiT-B (12 heads) and BEiT-L (16 heads).
    "_table_grad_kernel": KernelSpec(
        "kernels.rel_pos_bias", "DENSE:*x ORDER:*i32 OFFSETS:*i32 DTABLE:*fp32 H:i32 P:i32", {},
        fixed={"BLOCK_J": 64, "BLOCK_H": 16}, extra_dtypes=("fp32",),
    ),
    # LOGITS in the compute dtype; V = 8192 (the DALL-E tokenizer) makes stride_row, V and row_start multiples of 16
    # and BLOCK_V = min(4096, next_pow2(V)) = 4096.
    "_cross_entropy_kernel": KernelSpec(
        "kernels.masked_lm_loss",
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


# ---------------------------------------------------------------------------------------------------------------
# Building the sweep
# ---------------------------------------------------------------------------------------------------------------


def _config_key(config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _kernel_function(name: str):
    spec = SPECS[name]
    try:
        return getattr(importlib.import_module(spec.module), name)
    except AttributeError:
        raise UserError(f"{spec.module} has no kernel {name}: update SPECS in kernels/aot.py") from None


def _candidate_configs(name: str) -> list:
    spec = SPECS[name]
    if spec.configs is None:
        return [triton.Config(dict(spec.fixed), num_warps=spec.num_warps, num_stages=spec.num_stages)]
    module = importlib.import_module(spec.module)
    if not hasattr(module, spec.configs):
        raise UserError(f"{spec.module} has no {spec.configs}() for {name}: update SPECS in kernels/aot.py")
    return list(getattr(module, spec.configs)())


def _call_hook(name: str, arch: int, head_dim: int | None) -> list | None:
    spec = SPECS[name]
    hook = getattr(importlib.import_module(spec.module), HOOK_NAME, None)
    if spec.configs is None or hook is None:
        return None
    configs = hook(name, arch=arch, head_dim=head_dim)
    return None if configs is None else list(configs)


def _pruned_configs(name: str, arch: int, head_dim: int | None) -> list | None:
    """The configs the kernel autotunes on this arch (its module's aot_configs hook), or None without a hook.
    A hook that raises gives an empty list (hook_failures reports it): the sweep still runs, e.g. to fill the list."""
    try:
        return _call_hook(name, arch, head_dim)
    except Exception:  # noqa: BLE001 - reported by hook_failures
        return []


def hook_failures(kernels: list[str], archs: list[int], head_dims: list[int]) -> list[str]:
    lines = []
    for name in kernels:
        dims = head_dims if "head_dim" in SPECS[name].axes else [None]
        for arch in archs:
            for head_dim in dims:
                try:
                    _call_hook(name, arch, head_dim)
                except Exception as error:  # noqa: BLE001 - one line per failing call
                    lines.append(f"PRUNED LIST ERROR {SPECS[name].module}.{HOOK_NAME}('{name}', arch={arch}, "
                                 f"head_dim={head_dim}): {_one_line(error)}")
    return lines


def _shape_axes(name: str, head_dims: list[int]) -> list[tuple]:
    """(head_dim, has_bias, table dtype choice) combinations the kernel is compiled for."""
    axes = SPECS[name].axes
    dims = head_dims if "head_dim" in axes else [None]
    out = []
    for head_dim in dims:
        if "bias" not in axes:
            out.append((head_dim, None, None))
            continue
        out.append((head_dim, False, None))
        out += [(head_dim, True, table) for table in TABLE_DTYPES]
    return out


def build_variants(kernels: list[str], archs: list[int], dtypes: list[str], head_dims: list[int], subset: str
                   ) -> list[Variant]:
    variants = []
    for name in kernels:
        candidates = _candidate_configs(name)
        kernel_dtypes = list(dtypes) + [d for d in SPECS[name].extra_dtypes if d not in dtypes]
        for arch in archs:
            for head_dim, has_bias, table in _shape_axes(name, head_dims):
                pruned = _pruned_configs(name, arch, head_dim)
                configs = _configs_to_compile(candidates, pruned, subset)
                pruned_keys = {_config_key(c) for c in (pruned if pruned is not None else candidates)}
                candidate_keys = {_config_key(c) for c in candidates}
                for dtype in kernel_dtypes:
                    table_dtype = None if table is None else (dtype if table == "same" else table)
                    if table == "fp32" and dtype == "fp32":
                        continue  # same as "same"
                    for config in configs:
                        key = _config_key(config)
                        variants.append(Variant(
                            name, arch, dtype, head_dim, has_bias, table_dtype, key[0], config.num_warps,
                            config.num_stages, getattr(config, "num_ctas", 1), getattr(config, "maxnreg", None),
                            candidate=key in candidate_keys, pruned=key in pruned_keys,
                        ))
    return variants


def _configs_to_compile(candidates: list, pruned: list | None, subset: str) -> list:
    if subset == "ci":
        return pruned if pruned else candidates  # without a hook every candidate is tuned over, so checked
    extra = [c for c in (pruned or []) if _config_key(c) not in {_config_key(k) for k in candidates}]
    return candidates + extra


# ---------------------------------------------------------------------------------------------------------------
# Compiling one variant (runs in a worker process)
# ---------------------------------------------------------------------------------------------------------------


def _parse_args_spec(spec: KernelSpec) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) for item in spec.args.split()]


def check_spec(name: str, fn) -> None:
    """The spec's argument names must be the kernel's non-constexpr arguments, in order."""
    spec = SPECS[name]
    declared = [arg for arg, _ in _parse_args_spec(spec)]
    constexprs = [arg for arg in fn.arg_names if arg not in declared]
    runtime = [arg for arg in fn.arg_names if arg in declared]
    missing = [arg for arg in constexprs if arg not in spec.constexprs and arg not in _meta_names(name)]
    if runtime != declared or missing:
        extra = [arg for arg in declared if arg not in fn.arg_names]
        raise UserError(f"SPECS['{name}'] in kernels/aot.py is stale: kernel args {fn.arg_names}; spec lacks "
                        f"{missing}, has unknown {extra}")


def _meta_names(name: str) -> set[str]:
    return {key for config in _candidate_configs(name) for key in config.kwargs}


def _arg_type(kind: str, variant: Variant) -> tuple[str, bool]:
    """(Triton signature type, divisible by 16) of one argument kind of the spec."""
    if kind == "*x":
        return f"*{variant.dtype}", True
    if kind == "*t":
        return f"*{variant.table_dtype or variant.dtype}", True
    if kind.startswith("*"):
        return kind, True
    if kind == "i32/16":
        return "i32", True
    if kind in ("i32", "i64", "fp32"):
        return kind, False
    raise UserError(f"unknown argument kind {kind!r} in SPECS of kernels/aot.py")


def _ast_source(fn, variant: Variant):
    spec = SPECS[variant.kernel]
    kinds = dict(_parse_args_spec(spec))
    signature, attrs = {}, {}
    constexprs = {name: (value(variant) if callable(value) else value) for name, value in spec.constexprs.items()}
    constexprs.update(dict(variant.meta))
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        signature[arg], divisible = _arg_type(kinds[arg], variant)
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


@contextlib.contextmanager
def _ptxas_log():
    """Triton prints ptxas' -v log to stdout when dump_ptxas_log is on: capture it (and any PTX dump on error)."""
    knobs = triton.knobs.nvidia
    previous = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        knobs.dump_ptxas_log = previous


_PTXAS_PATTERNS = {
    "stack_bytes": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "n_regs": r"Used (\d+) registers",
}


def parse_ptxas_log(log: str) -> dict:
    values = {}
    for field, pattern in _PTXAS_PATTERNS.items():
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"no '{pattern}' in the ptxas log (Triton did not print it?): {log[-300:]!r}")
        values[field] = int(match.group(1))
    values["n_spills"] = values["stack_bytes"] // 4  # what CompiledKernel.n_spills reports (local bytes / 4)
    return values


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " | ".join(lines[:3]) if lines else ""
    return f"{type(error).__name__}: {text}"[:400]


def compile_variant(variant: Variant) -> dict:
    """Compile one variant; never raises: an error becomes the row's `error` field."""
    row = _row_base(variant)
    start = time.perf_counter()
    try:
        fn = _kernel_function(variant.kernel)
        check_spec(variant.kernel, fn)
        options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages, "num_ctas": variant.num_ctas}
        if variant.maxnreg is not None:
            options["maxnreg"] = variant.maxnreg
        target = GPUTarget("cuda", variant.arch, 32)
        with warnings.catch_warnings(), _ptxas_log() as log:
            warnings.simplefilter("ignore")  # e.g. 3.9's TRITON_DEFAULT_FP_FUSION notice, once per worker
            compiled = triton.compile(_ast_source(fn, variant), target=target, options=options)
        row["compile_s"] = round(time.perf_counter() - start, 3)
        row.update(parse_ptxas_log(log.getvalue()))
        row["shared"] = int(compiled.metadata.shared)
    except Exception as error:  # noqa: BLE001 - one variant's failure must not stop the sweep
        row["compile_s"] = round(time.perf_counter() - start, 3)
        row["error"] = _one_line(error)
        row["error_detail"] = str(error)[-4000:]
    return row


def _row_base(variant: Variant) -> dict:
    fields = dataclasses.asdict(variant)
    fields["meta"] = dict(variant.meta)
    fields["config"] = variant.config_label()
    fields.update(n_regs=None, n_spills=None, spill_stores=None, spill_loads=None, stack_bytes=None, shared=None,
                  shared_limit=SMEM_LIMITS.get(variant.arch), compile_s=None, error=None)
    return fields


# ---------------------------------------------------------------------------------------------------------------
# Running the sweep
# ---------------------------------------------------------------------------------------------------------------


def _progress(done: int, total: int, started: float) -> None:
    if done % 25 == 0 or done == total:
        print(f"  {done}/{total} compiled ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def run_sweep(variants: list[Variant], jobs: int) -> list[dict]:
    """Compile in pools of worker processes, a fresh pool per batch of TASKS_PER_WORKER × jobs variants (a worker
    grows by ~0.6 MB per compile: 1 GB after 1000; the pool's own max_tasks_per_child hung on Python 3.11 when its
    workers retired). If a worker dies (segfault, out of memory), its pool breaks and every unfinished variant is
    retried in a one-worker pool, in order: there the first unfinished one is the culprit."""
    started = time.perf_counter()
    rows: dict[int, dict] = {}
    items = list(enumerate(variants))
    batch = TASKS_PER_WORKER * jobs
    pending = []
    for first in range(0, len(items), batch):
        pending += _run_pool(items[first:first + batch], jobs, rows, started, len(variants))
    while pending:
        pending = _run_pool(pending, 1, rows, started, len(variants))
        if pending:
            index, variant = pending.pop(0)
            rows[index] = {**_row_base(variant), "error": "worker process crashed while compiling this variant"}
    return [rows[index] for index in range(len(variants))]


def _run_pool(items: list[tuple[int, Variant]], jobs: int, rows: dict, started: float, total: int) -> list:
    crashed = []
    context = multiprocessing.get_context("spawn")  # no fork of a process that imported torch/triton
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_variant, variant): (index, variant) for index, variant in items}
        for future in concurrent.futures.as_completed(futures):
            index, variant = futures[future]
            try:
                rows[index] = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                crashed.append((index, variant))
                continue
            _progress(len(rows), total, started)
    return sorted(crashed, key=lambda item: item[0])


# ---------------------------------------------------------------------------------------------------------------
# The failure rule and the report
# ---------------------------------------------------------------------------------------------------------------


def _spills(row: dict) -> bool:
    return bool(row["spill_stores"] or row["spill_loads"])


def _compiled(row: dict) -> bool:
    return row["error"] is None


def _overflows(row: dict) -> bool:
    return _compiled(row) and row["shared_limit"] is not None and row["shared"] > row["shared_limit"]


def _usable(row: dict) -> bool:
    return _compiled(row) and not _spills(row) and not _overflows(row)


def _group_label(row: dict) -> str:
    parts = [row["kernel"], f"sm_{row['arch']}", row["dtype"]]
    if row["table_dtype"] is not None:
        parts.append(f"table={row['table_dtype']}")
    if row["head_dim"] is not None:
        parts.append(f"D={row['head_dim']}")
    if row["has_bias"] is not None:
        parts.append("bias" if row["has_bias"] else "no-bias")
    return " ".join(parts)


def _group_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("kernel", "arch", "dtype", "head_dim", "has_bias", "table_dtype"))


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    return groups


def failures(rows: list[dict]) -> list[str]:
    """One line per failure: compile errors, shared-memory overflows, groups with no spill-free config, and
    spilling configs of the pruned list."""
    lines = []
    for row in rows:
        where = f"{_group_label(row)} [{row['config']}]"
        if not _compiled(row):
            lines.append(f"COMPILE ERROR {where}: {row['error']}")
        elif row.get("pruned") and _overflows(row):  # a candidate that overflows is pruned out, not a failure
            lines.append(f"SMEM OVERFLOW {where}: {row['shared']} B > {row['shared_limit']} B")
        elif row.get("pruned") and _spills(row):
            lines.append(f"PRUNED CONFIG SPILLS {where}: {row['spill_stores']} B stores, {row['spill_loads']} B "
                         f"loads, {row['n_regs']} regs")
    for group in group_rows(rows).values():
        compiled = [row for row in group if _compiled(row)]
        if compiled and not any(_usable(row) for row in compiled):
            fewest = min(compiled, key=lambda row: (row["spill_stores"] or 0) + (row["spill_loads"] or 0))
            lines.append(f"NO SPILL-FREE CONFIG {_group_label(group[0])}: all {len(compiled)} compiled configs spill "
                         f"or overflow (least: [{fewest['config']}] {fewest['spill_stores']} B stores)")
    return lines


def candidate_overflows(rows: list[dict]) -> list[str]:
    """Candidates the pruned list leaves out that would not launch (Triton raises OutOfResources at load)."""
    return [f"{_group_label(row)} [{row['config']}]: {row['shared']} B > {row['shared_limit']} B"
            for row in rows if _overflows(row) and not row.get("pruned")]


def _compile_state(row: dict) -> str:
    if not _compiled(row):
        return "compile error"
    return f"{row['n_regs']} regs, spill {row['spill_stores']}/{row['spill_loads']} B, smem {row['shared']} B"


def compare(rows_a: list[dict], rows_b: list[dict], names: tuple[str, str] = ("A", "B")) -> list[str]:
    """Two sweeps (e.g. two Triton versions) side by side: how many variants each has and both have, and each one in
    both that is usable (compiles, no spill, fits shared memory) in one sweep and not in the other."""
    keyed_a = {(_group_key(row), row["config"]): row for row in rows_a}
    keyed_b = {(_group_key(row), row["config"]): row for row in rows_b}
    both = [(keyed_a[key], keyed_b[key]) for key in keyed_a if key in keyed_b]
    differ = [(a, b) for a, b in both if _usable(a) != _usable(b)]
    lines = [f"variants in both: {len(both)}; only in {names[0]}: {len(keyed_a) - len(both)}; only in {names[1]}: "
             f"{len(keyed_b) - len(both)}; usable in both: {sum(_usable(a) and _usable(b) for a, b in both)}; "
             f"in neither: {sum(not _usable(a) and not _usable(b) for a, b in both)}; differ: {len(differ)}"]
    lines += [f"{_group_label(a)} [{a['config']}]: {names[0]} {_compile_state(a)}; {names[1]} {_compile_state(b)}"
              for a, b in differ]
    return lines


def _short_config(row: dict) -> str:
    meta = row["meta"]
    if "BLOCK_M" in meta and "BLOCK_N" in meta:
        tiles = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}"
    else:
        tiles = ",".join(f"{key}={value}" for key, value in meta.items())
    return f"{tiles} w{row['num_warps']}s{row['num_stages']}"


def _fmt(value) -> str:
    return "-" if value is None else str(value)


def summary_table(rows: list[dict], pruned_only: bool = False) -> str:
    """One markdown row per group: how many configs compiled, how many are spill-free, and which."""
    header = ("| kernel | arch | dtype | table | D | bias | configs | spill-free | regs | max smem B (limit) "
              "| spill-free configs (BLOCK_M x BLOCK_N, warps, stages) |")
    lines = [header, "|" + "---|" * 11]
    for group in group_rows(rows).values():
        group = [row for row in group if row.get("pruned")] if pruned_only else group
        if not group:
            continue
        first = group[0]
        compiled = [row for row in group if _compiled(row)]
        usable = [row for row in compiled if _usable(row)]
        regs = [row["n_regs"] for row in compiled]
        reg_range = f"{min(regs)}-{max(regs)}" if regs else "-"
        smem = max((row["shared"] for row in compiled), default=None)
        errors = len(group) - len(compiled)
        configs = f"{len(group)}" + (f" ({errors} errors)" if errors else "")
        lines.append(
            f"| {first['kernel']} | sm_{first['arch']} | {first['dtype']} | {_fmt(first['table_dtype'])} "
            f"| {_fmt(first['head_dim'])} | {_fmt(first['has_bias'])} | {configs} "
            f"| {len(usable)} | {reg_range} | {_fmt(smem)} ({_fmt(first['shared_limit'])}) "
            f"| {', '.join(_short_config(row) for row in usable) or '**none**'} |"
        )
    return "\n".join(lines)


def variants_table(rows: list[dict]) -> str:
    header = ("| kernel | arch | dtype | table | D | bias | config | pruned | regs | spill st/ld B | stack B "
              "| smem B | limit | compile s | error |")
    lines = [header, "|" + "---|" * 15]
    for row in rows:
        spills = "-" if row["spill_stores"] is None else f"{row['spill_stores']}/{row['spill_loads']}"
        lines.append(
            f"| {row['kernel']} | sm_{row['arch']} | {row['dtype']} | {_fmt(row['table_dtype'])} "
            f"| {_fmt(row['head_dim'])} | {_fmt(row['has_bias'])} | {row['config']} "
            f"| {_fmt(row.get('pruned'))} | {_fmt(row['n_regs'])} | {spills} | {_fmt(row['stack_bytes'])} "
            f"| {_fmt(row['shared'])} | {_fmt(row['shared_limit'])} | {_fmt(row['compile_s'])} "
            f"| {(row['error'] or '').replace('|', '/')} |"
        )
    return "\n".join(lines)


def render_report(rows: list[dict], header: dict, failure_lines: list[str], hooks: dict[str, bool]) -> str:
    pruned_note = ", ".join(f"{kernel}: {'aot_configs hook' if has else 'no hook, pruned list = all candidates'}"
                            for kernel, has in hooks.items())
    parts = [
        f"# AOT compile check — Triton {header['triton']}, {header['date']}",
        f"subset={header['subset']} archs={header['archs']} dtypes={header['dtypes']} head_dims={header['head_dims']}"
        f" variants={len(rows)} wall={header['wall_s']} s jobs={header['jobs']}",
        f"ptxas: {header['ptxas']}; kernel sources sha256[:12]: {header['kernels_sha']}",
        "",
        "## Candidate sweep (every compiled config)",
        summary_table(rows),
        "",
        f"## Pruned list ({pruned_note})",
        summary_table(rows, pruned_only=True) if any(hooks.values()) else "(same as the candidate sweep)",
        "",
        "## Failures" if failure_lines else "## No failures",
        *[f"- {line}" for line in failure_lines],
        "",
        "## Candidates over the shared-memory limit (outside the pruned list: reported, not failures)",
        *([f"- {line}" for line in candidate_overflows(rows)] or ["none"]),
        "",
        "## Every variant",
        variants_table(rows),
        "",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Checking the spec against the launchers (--check-launchers)
# The launchers run on CPU tensors shaped like BEiT-B's (q, k, v sliced from one qkv projection, N = 197, an fp32
# table as under autocast, V = 8192) under a stand-in driver; Triton's jit_cache_hook records each specialised
# signature and skips the compile. Each must equal what the spec gives for the same variant.
# ---------------------------------------------------------------------------------------------------------------


class _StandInDriver:
    """Just enough of a GPU driver for Triton to specialise a launch: nothing is compiled or run."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def _recorded_launches():
    from triton.runtime import driver

    launches: list[tuple[str, dict, dict, dict]] = []

    def record(**kwargs) -> bool:
        compile_args = kwargs["compile"]
        launches.append((kwargs["fn"].name, compile_args["signature"], compile_args["constants"],
                         compile_args["configs"][0]))
        return True  # "already compiled": Triton skips the compile and the launch

    previous_hook, previous_driver = triton.knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_StandInDriver())
    triton.knobs.runtime.jit_cache_hook = record
    try:
        yield launches
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver  # not reset_active(): that builds the real driver, which needs a GPU


def _launch_beit_shapes() -> None:
    import torch

    attention = importlib.import_module("kernels.rel_pos_attention")
    bias = importlib.import_module("kernels.rel_pos_bias")
    mlm = importlib.import_module("kernels.masked_lm_loss")
    batch, heads, tokens, head_dim, rows, vocab, channels = 2, 12, 197, 64, 732, 8192, 768
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    table, index = torch.randn(rows, heads), torch.randint(0, rows, (tokens, tokens))
    out, lse = attention.rel_pos_attention_forward(q, k, v, table, index, head_dim**-0.5)
    plan = bias.table_grad_plan(index, rows)
    # a CPU tensor has 1 "SM": a GPU's count gives the batch groups of a real launch (1 would be a constant)
    with _patched(attention, "device_sm_count", lambda device: 132):
        attention.rel_pos_attention_backward(torch.randn_like(out), q, k, v, out, lse, table, index, *plan,
                                             head_dim**-0.5)
    hidden = torch.randn(batch, tokens - 1, channels, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (batch, tokens - 1))
    mlm.masked_lm_loss_forward(hidden, torch.rand(batch, tokens - 1) < 0.4, torch.randn(vocab, channels), None, labels)


@contextlib.contextmanager
def _patched(module, name: str, value):
    missing = object()
    previous = getattr(module, name, missing)
    setattr(module, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(module, name)
        else:
            setattr(module, name, previous)


def _variant_of_launch(name: str, signature: dict, constants: dict) -> Variant:
    """The spec variant of a recorded launch: dtypes from its pointer types, the rest from its constexprs."""
    kinds = dict(_parse_args_spec(SPECS[name]))
    by_kind = {kind: signature[arg].lstrip("*") for arg, kind in reversed(kinds.items())}
    values = {arg: constants[(index,)] for index, arg in enumerate(signature) if (index,) in constants}
    meta = tuple(sorted((key, values[key]) for key in _meta_names(name) if key in values))
    has_bias = values.get("HAS_BIAS")
    table = by_kind.get("*t") if has_bias else None
    return Variant(name, 90, by_kind["*x"], values.get("HEAD_DIM"), has_bias, table,
                   meta, 4, 3)


def _divisible(attrs: dict) -> set[int]:
    return {index[0] for index, values in attrs.items() if ["tt.divisibility", 16] in [list(v) for v in values]}


def launch_mismatches(launches: list[tuple[str, dict, dict, dict]]) -> list[str]:
    """One line per argument whose type, divisibility or constexpr value differs between a launch and the spec."""
    lines = []
    for name, signature, constants, attrs in launches:
        if name not in SPECS:
            lines.append(f"LAUNCH NOT IN SPEC {name}: add it to SPECS in kernels/aot.py")
            continue
        fn = _kernel_function(name)
        source = _ast_source(fn, _variant_of_launch(name, signature, constants))
        spec_divisible, launch_divisible = _divisible(source.attrs), _divisible(attrs)
        for index, arg in enumerate(fn.arg_names):
            spec_type, launch_type = source.signature[arg], signature[arg]
            spec_value, launch_value = source.constants.get((index,)), constants.get((index,))
            if spec_type != launch_type or spec_value != launch_value:
                lines.append(f"SPEC MISMATCH {name}.{arg}: spec {spec_type} {_fmt(spec_value)}, launcher "
                             f"{launch_type} {_fmt(launch_value)}")
            elif (index in spec_divisible) != (index in launch_divisible):
                lines.append(f"SPEC MISMATCH {name}.{arg}: spec divisible by 16 = {index in spec_divisible}, "
                             f"launcher {index in launch_divisible}")
    return sorted(set(lines))


def check_launchers() -> int:
    with _recorded_launches() as launches:
        _launch_beit_shapes()
    lines = launch_mismatches(launches)
    kernels = sorted({name for name, *_ in launches})
    print(f"kernels.aot: {len(launches)} launches of {len(kernels)} kernels recorded ({', '.join(kernels)})")
    missing = [name for name in SPECS if name not in kernels]
    lines += [f"SPEC KERNEL NOT LAUNCHED {name}: _launch_beit_shapes never launches it" for name in missing]
    for line in lines:
        print(line)
    if not lines:
        print("kernels.aot: every recorded launch matches the spec")
    return 1 if lines else 0


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _str_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="ci")
    parser.add_argument("--arch", type=_int_list, default=[80, 90], help="compute capabilities, e.g. 80,90")
    parser.add_argument("--head-dims", type=_int_list, default=None, help="default: ci 64; full 64,128")
    parser.add_argument("--dtypes", type=_str_list, default=None, help="default: ci bf16; full bf16,fp16")
    parser.add_argument("--kernels", type=_str_list, default=list(SPECS), help="default: every kernel in SPECS")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep Triton's cache here (default: a temp dir)")
    parser.add_argument("--check-launchers", action="store_true",
                        help="only check that SPECS matches what the launchers pass Triton (seconds, no compile)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.jsonl", "B.jsonl"),
                        help="only compare two result files: the variants usable in one and not the other")
    args = parser.parse_args(argv)
    args.head_dims = args.head_dims or ([64] if args.subset == "ci" else [64, 128])
    args.dtypes = args.dtypes or (["bf16"] if args.subset == "ci" else list(ALL_DTYPES))
    return args


_ROW_FIELDS = ("kernel", "arch", "dtype", "head_dim", "has_bias", "table_dtype", "config", "error", "n_regs",
               "spill_stores", "spill_loads", "shared", "shared_limit")


def _read_rows(path: Path) -> list[dict]:
    """The rows of a result file, or a UserError naming the file when it is not one."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path} as AOT result rows ({error}): give a .jsonl that kernels.aot wrote")
    if not rows or not all(isinstance(row, dict) and all(field in row for field in _ROW_FIELDS) for row in rows):
        raise UserError(f"{path} holds no AOT result rows (each line needs {', '.join(_ROW_FIELDS)}): give a .jsonl "
                        "that kernels.aot wrote")
    return rows


def _check_args(args: argparse.Namespace) -> None:
    unknown = [name for name in args.kernels if name not in SPECS]
    if unknown:
        raise UserError(f"unknown kernel(s) {unknown}; known: {', '.join(SPECS)}")
    bad_arch = [arch for arch in args.arch if arch not in SMEM_LIMITS]
    if bad_arch:
        raise UserError(f"--arch {bad_arch} has no shared-memory limit in SMEM_LIMITS; use 80 and/or 90")
    bad_dtypes = [d for d in args.dtypes if d not in ("bf16", "fp16", "fp32")]
    if bad_dtypes:
        raise UserError(f"--dtypes {bad_dtypes}: use bf16, fp16 or fp32")


def ptxas_versions(archs: list[int]) -> str:
    """Resolve the ptxas each arch compiles with, or raise a UserError naming the fix."""
    if not hasattr(triton, "knobs") or not hasattr(triton.knobs.nvidia, "dump_ptxas_log"):
        raise UserError(f"Triton {triton.__version__} lacks knobs.nvidia.dump_ptxas_log: use Triton >= 3.4")
    from triton.backends.nvidia.compiler import get_ptxas

    found = {}
    for arch in archs:
        try:
            tool = get_ptxas(arch)
        except RuntimeError as error:
            raise UserError(f"no ptxas for sm_{arch} ({error}): set TRITON_PTXAS_PATH (and TRITON_PTXAS_BLACKWELL_PATH "
                            "for sm_90 on Triton >= 3.9) to a CUDA >= 12.8 ptxas, or reinstall the triton wheel"
                            ) from None
        found[f"sm_{arch}"] = f"{Path(tool.path).name} {tool.version}"
    return ", ".join(f"{arch}: {tool}" for arch, tool in found.items())


def run_tag(args: argparse.Namespace) -> str:
    """File-name tag: `triton-3.9.0` for the default full sweep, with the subset and any narrowed axis otherwise,
    so a partial run never overwrites the full one."""
    defaults = parse_args([f"--subset={args.subset}"])
    parts = [f"triton-{triton.__version__}"] + ([args.subset] if args.subset != "full" else [])
    if args.arch != defaults.arch:
        parts.append("sm" + "-".join(map(str, args.arch)))
    if args.head_dims != defaults.head_dims:
        parts.append("D" + "-".join(map(str, args.head_dims)))
    if args.dtypes != defaults.dtypes:
        parts.append("-".join(args.dtypes))
    if args.kernels != defaults.kernels:
        parts.append(f"{len(args.kernels)}kernels")
    return "_".join(parts)


def write_outputs(out_dir: Path, tag: str, rows: list[dict], header: dict, report: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, markdown = out_dir / f"aot_{tag}.jsonl", out_dir / f"aot_{tag}.md"
    with jsonl.open("w") as handle:
        for row in rows:
            fields = ("triton", "date", "subset", "ptxas", "kernels_sha")
            handle.write(json.dumps({**{key: header[key] for key in fields}, **row}) + "\n")
    markdown.write_text(report)
    return jsonl, markdown


def kernels_source_hash(kernels: list[str]) -> str:
    """A short hash of the kernel modules' sources: which version of the kernels a result file describes."""
    digest = hashlib.sha256()
    for module in sorted({SPECS[name].module for name in kernels}):
        digest.update(Path(importlib.import_module(module).__file__).read_bytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _triton_cache(cache_dir: Path | None):
    """A throwaway TRITON_CACHE_DIR (so every variant is a real compile) unless the user gives one."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    path = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="triton_aot_"))
    os.environ["TRITON_CACHE_DIR"] = str(path)  # spawned workers inherit it
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
        if cache_dir is None:
            shutil.rmtree(path, ignore_errors=True)


def _check_not_interpreted() -> None:
    if triton.knobs.runtime.interpret:
        raise UserError("TRITON_INTERPRET=1 turns @triton.jit kernels into interpreted functions, nothing to "
                        "compile: run without it (e.g. `env -u TRITON_INTERPRET python -m kernels.aot`)")


def _prepare(args: argparse.Namespace) -> tuple[str, list[Variant]]:
    """Check everything a sweep needs before it starts; a UserError names the fix."""
    _check_not_interpreted()
    _check_args(args)
    ptxas = ptxas_versions(args.arch)
    for name in args.kernels:
        check_spec(name, _kernel_function(name))
    return ptxas, build_variants(args.kernels, args.arch, args.dtypes, args.head_dims, args.subset)


def report(rows: list[dict], args: argparse.Namespace, header: dict) -> int:
    """Print the summary and the failures, write the JSONL and markdown files; the exit status (1 on failures)."""
    hooks = {name: hasattr(importlib.import_module(SPECS[name].module), HOOK_NAME) for name in args.kernels
             if SPECS[name].configs is not None}
    failure_lines = hook_failures(args.kernels, args.arch, args.head_dims) + failures(rows)
    jsonl, markdown = write_outputs(args.out, run_tag(args), rows, header,
                                    render_report(rows, header, failure_lines, hooks))
    print(summary_table(rows))
    print(f"\n{len(rows)} variants in {header['wall_s']} s; wrote {jsonl} and {markdown}")
    for line in failure_lines:
        print(line)
    return 1 if failure_lines else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.check_launchers:
            _check_not_interpreted()
            return check_launchers()
        if args.compare:
            names = [path.name for path in args.compare]
            names = names if names[0] != names[1] else [str(path) for path in args.compare]
            lines = compare(*[_read_rows(path) for path in args.compare], names=tuple(names))
            print("\n".join(lines))
            return 1 if len(lines) > 1 else 0  # 1: some variant is usable in one sweep only
        ptxas, variants = _prepare(args)
    except UserError as error:
        print(f"kernels.aot: {error}", file=sys.stderr)
        return 2
    print(f"kernels.aot: Triton {triton.__version__}, {len(variants)} variants, {args.jobs} jobs, ptxas {ptxas}",
          file=sys.stderr)
    kernels_sha = kernels_source_hash(args.kernels)  # before the sweep: the sources its workers compile
    started = time.perf_counter()
    with _triton_cache(args.cache_dir):
        rows = run_sweep(variants, args.jobs)
    header = {
        "triton": triton.__version__, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "subset": args.subset, "archs": args.arch, "dtypes": args.dtypes, "head_dims": args.head_dims,
        "wall_s": round(time.perf_counter() - started, 1), "jobs": args.jobs, "ptxas": ptxas,
        "kernels_sha": kernels_sha,
    }
    return report(rows, args, header)


if __name__ == "__main__":
    sys.exit(main())

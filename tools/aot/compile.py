"""Compiling one variant down to a cubin with Triton's bundled ptxas (in worker processes), and running the sweep."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import multiprocessing
import re
import sys
import time
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tools.aot.spec import SMEM_LIMITS, SPECS, TASKS_PER_WORKER, KernelSpec, UserError, Variant, one_line
from tools.aot.sweep import candidate_configs, kernel_function

# ---------------------------------------------------------------------------------------------------------------
# Compiling one variant (runs in a worker process)
# ---------------------------------------------------------------------------------------------------------------


def parse_args_spec(spec: KernelSpec) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) for item in spec.args.split()]


def check_spec(name: str, fn) -> None:
    """The spec's argument names must be the kernel's non-constexpr arguments, in order."""
    spec = SPECS[name]
    declared = [arg for arg, _ in parse_args_spec(spec)]
    constexprs = [arg for arg in fn.arg_names if arg not in declared]
    runtime = [arg for arg in fn.arg_names if arg in declared]
    missing = [arg for arg in constexprs if arg not in spec.constexprs and arg not in meta_names(name)]
    if runtime != declared or missing:
        extra = [arg for arg in declared if arg not in fn.arg_names]
        raise UserError(f"SPECS['{name}'] in tools/aot/spec.py is stale: kernel args {fn.arg_names}; spec lacks "
                        f"{missing}, has unknown {extra}")


def meta_names(name: str) -> set[str]:
    return {key for config in candidate_configs(name) for key in config.kwargs}


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
    raise UserError(f"unknown argument kind {kind!r} in SPECS of tools/aot/spec.py")


def ast_source(fn, variant: Variant):
    spec = SPECS[variant.kernel]
    kinds = dict(parse_args_spec(spec))
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


def compile_variant(variant: Variant) -> dict:
    """Compile one variant; never raises: an error becomes the row's `error` field."""
    row = _row_base(variant)
    start = time.perf_counter()
    try:
        fn = kernel_function(variant.kernel)
        check_spec(variant.kernel, fn)
        options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages, "num_ctas": variant.num_ctas}
        if variant.maxnreg is not None:
            options["maxnreg"] = variant.maxnreg
        target = GPUTarget("cuda", variant.arch, 32)
        with warnings.catch_warnings(), _ptxas_log() as log:
            warnings.simplefilter("ignore")  # e.g. 3.9's TRITON_DEFAULT_FP_FUSION notice, once per worker
            compiled = triton.compile(ast_source(fn, variant), target=target, options=options)
        row["compile_s"] = round(time.perf_counter() - start, 3)
        row.update(parse_ptxas_log(log.getvalue()))
        row["shared"] = int(compiled.metadata.shared)
    except Exception as error:  # noqa: BLE001 - one variant's failure must not stop the sweep
        row["compile_s"] = round(time.perf_counter() - start, 3)
        row["error"] = one_line(error)
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



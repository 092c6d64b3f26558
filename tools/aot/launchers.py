"""Checking the spec against what the launchers pass Triton (--check-launchers), under a stand-in driver."""

from __future__ import annotations

import contextlib
import importlib

import triton
from triton.backends.compiler import GPUTarget

from tools.aot.compile import ast_source, meta_names, parse_args_spec
from tools.aot.report import fmt
from tools.aot.spec import SPECS, Variant
from tools.aot.sweep import kernel_function

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

    attention = importlib.import_module("beit_kernels.rel_pos_attention")
    bias = importlib.import_module("beit_kernels.rel_pos_bias")
    mlm = importlib.import_module("beit_kernels.masked_lm_loss")
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
    kinds = dict(parse_args_spec(SPECS[name]))
    by_kind = {kind: signature[arg].lstrip("*") for arg, kind in reversed(kinds.items())}
    values = {arg: constants[(index,)] for index, arg in enumerate(signature) if (index,) in constants}
    meta = tuple(sorted((key, values[key]) for key in meta_names(name) if key in values))
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
            lines.append(f"LAUNCH NOT IN SPEC {name}: add it to SPECS in tools/aot/spec.py")
            continue
        fn = kernel_function(name)
        source = ast_source(fn, _variant_of_launch(name, signature, constants))
        spec_divisible, launch_divisible = _divisible(source.attrs), _divisible(attrs)
        for index, arg in enumerate(fn.arg_names):
            spec_type, launch_type = source.signature[arg], signature[arg]
            spec_value, launch_value = source.constants.get((index,)), constants.get((index,))
            if spec_type != launch_type or spec_value != launch_value:
                lines.append(f"SPEC MISMATCH {name}.{arg}: spec {spec_type} {fmt(spec_value)}, launcher "
                             f"{launch_type} {fmt(launch_value)}")
            elif (index in spec_divisible) != (index in launch_divisible):
                lines.append(f"SPEC MISMATCH {name}.{arg}: spec divisible by 16 = {index in spec_divisible}, "
                             f"launcher {index in launch_divisible}")
    return sorted(set(lines))


def check_launchers() -> int:
    with _recorded_launches() as launches:
        _launch_beit_shapes()
    lines = launch_mismatches(launches)
    kernels = sorted({name for name, *_ in launches})
    print(f"tools.aot: {len(launches)} launches of {len(kernels)} kernels recorded ({', '.join(kernels)})")
    missing = [name for name in SPECS if name not in kernels]
    lines += [f"SPEC KERNEL NOT LAUNCHED {name}: _launch_beit_shapes never launches it" for name in missing]
    for line in lines:
        print(line)
    if not lines:
        print("tools.aot: every recorded launch matches the spec")
    return 1 if lines else 0



"""Building the sweep: the variants (kernel × arch × dtype × shape × config) a run compiles."""

from __future__ import annotations

import importlib

import triton

from tools.aot.spec import HOOK_NAME, SPECS, TABLE_DTYPES, UserError, Variant, one_line

# ---------------------------------------------------------------------------------------------------------------
# Building the sweep
# ---------------------------------------------------------------------------------------------------------------


def _config_key(config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def kernel_function(name: str):
    spec = SPECS[name]
    try:
        return getattr(importlib.import_module(spec.module), name)
    except AttributeError:
        raise UserError(f"{spec.module} has no kernel {name}: update SPECS in tools/aot/spec.py") from None


def candidate_configs(name: str) -> list:
    spec = SPECS[name]
    if spec.configs is None:
        return [triton.Config(dict(spec.fixed), num_warps=spec.num_warps, num_stages=spec.num_stages)]
    module = importlib.import_module(spec.module)
    if not hasattr(module, spec.configs):
        raise UserError(f"{spec.module} has no {spec.configs}() for {name}: update SPECS in tools/aot/spec.py")
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
                                 f"head_dim={head_dim}): {one_line(error)}")
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
        candidates = candidate_configs(name)
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



"""The failure rule and the report: usable configs per group, spills, shared memory, comparisons of two sweeps."""

from __future__ import annotations

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


def fmt(value) -> str:
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
            f"| {first['kernel']} | sm_{first['arch']} | {first['dtype']} | {fmt(first['table_dtype'])} "
            f"| {fmt(first['head_dim'])} | {fmt(first['has_bias'])} | {configs} "
            f"| {len(usable)} | {reg_range} | {fmt(smem)} ({fmt(first['shared_limit'])}) "
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
            f"| {row['kernel']} | sm_{row['arch']} | {row['dtype']} | {fmt(row['table_dtype'])} "
            f"| {fmt(row['head_dim'])} | {fmt(row['has_bias'])} | {row['config']} "
            f"| {fmt(row.get('pruned'))} | {fmt(row['n_regs'])} | {spills} | {fmt(row['stack_bytes'])} "
            f"| {fmt(row['shared'])} | {fmt(row['shared_limit'])} | {fmt(row['compile_s'])} "
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



"""`python -m tools.aot`: the command line (see the package's docstring)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import triton

from tools.aot.compile import check_spec, run_sweep
from tools.aot.launchers import check_launchers
from tools.aot.report import compare, failures, render_report, summary_table
from tools.aot.spec import ALL_DTYPES, DEFAULT_OUT, HOOK_NAME, SMEM_LIMITS, SPECS, UserError, Variant
from tools.aot.sweep import build_variants, hook_failures, kernel_function

# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _str_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.aot", description=__doc__.splitlines()[0])
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
        raise UserError(f"cannot read {path} as AOT result rows ({error}): give a .jsonl that tools.aot wrote")
    if not rows or not all(isinstance(row, dict) and all(field in row for field in _ROW_FIELDS) for row in rows):
        raise UserError(f"{path} holds no AOT result rows (each line needs {', '.join(_ROW_FIELDS)}): give a .jsonl "
                        "that tools.aot wrote")
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
                        "compile: run without it (e.g. `env -u TRITON_INTERPRET python -m tools.aot`)")


def _prepare(args: argparse.Namespace) -> tuple[str, list[Variant]]:
    """Check everything a sweep needs before it starts; a UserError names the fix."""
    _check_not_interpreted()
    _check_args(args)
    ptxas = ptxas_versions(args.arch)
    for name in args.kernels:
        check_spec(name, kernel_function(name))
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
        print(f"tools.aot: {error}", file=sys.stderr)
        return 2
    print(f"tools.aot: Triton {triton.__version__}, {len(variants)} variants, {args.jobs} jobs, ptxas {ptxas}",
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

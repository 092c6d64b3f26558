"""Benchmark the relative position bias gather (`[R, H]` table → `[H, N, N]`): ours vs PyTorch indexing.

    python benchmarks/bench_rel_pos_bias.py   # GPU: BEiT-B/L at 224 and 384; CPU: one tiny shape (interpreter)
Rows go to benchmarks/results/rel_pos_bias.jsonl, or DIR/ with `--out=DIR` (ms, GB/s over the bias bytes written
(fwd) or read (bwd)); `--shapes=beit_base_224,...` runs a subset of the GPU shapes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    append_rows,
    environment,
    measure_ms,
    measure_row,
    parse_bench_args,
    peak_memory_mb,
    select_shapes,
    use_interpreter_on_cpu,
)

ON_CPU = use_interpreter_on_cpu()

import torch  # noqa: E402

import beit_kernels  # noqa: E402
from engine.pos_embed import relative_position_index  # noqa: E402

GPU_SHAPES = [("beit_base_224", 12, 14), ("beit_large_224", 16, 14), ("beit_base_384", 12, 24),
              ("beit_large_384", 16, 24)]  # name, heads, token grid side
CPU_SHAPES = [("tiny_cpu", 2, 4)]
PROVIDERS = {"ours": beit_kernels.rel_pos_bias, "torch": beit_kernels.rel_pos_bias_ref}


def call(provider, mode: str, shape, device: str):
    """The timed callable of one (provider, mode, shape), its row's shape fields and the bytes it moves (this
    script and the pytest-benchmark suite time the same)."""
    _, heads, side = shape
    index = relative_position_index((side, side)).to(device)
    table = torch.randn(int(index.max()) + 1, heads, device=device, requires_grad=True)
    grad = torch.randn(heads, *index.shape, device=device)
    if mode == "fwd":
        fn = lambda: provider(table, index)  # noqa: E731
    else:
        fn = lambda: provider(table, index).backward(grad)  # noqa: E731
    return fn, {"heads": heads, "tokens": index.shape[0]}, grad.numel() * 4 * (1 if mode == "fwd" else 2)


def bench_one(provider, mode: str, shape, device: str) -> dict:
    fn, info, moved_bytes = call(provider, mode, shape, device)
    median, p20, p80 = measure_ms(fn, device)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "gbps": moved_bytes / median / 1e6,
            "peak_mb": peak_memory_mb(fn, device), **info}


def main(argv: list[str] | None = None) -> None:
    args = parse_bench_args(argv, __doc__.splitlines()[0], GPU_SHAPES)
    device = "cpu" if ON_CPU else "cuda"
    env = environment(device)
    for shape in select_shapes(GPU_SHAPES, CPU_SHAPES, ON_CPU, args.shapes):
        for name, provider in PROVIDERS.items():
            for mode in ("fwd", "fwd+bwd"):
                base = {"bench": "rel_pos_bias", "shape": shape[0], "provider": name, "mode": mode,
                        "dtype": "float32", **env}
                interpreted = ON_CPU and name == "ours"
                row = measure_row(base, lambda: bench_one(provider, mode, shape, device), interpreted)
                append_rows("rel_pos_bias", [row], args.out)  # row by row: a timed-out run keeps its rows


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark the fused masked LM loss vs `F.cross_entropy(lm_head(x[mask]), labels[mask])`.

    python benchmarks/bench_masked_lm_loss.py   # GPU: BEiT-B/L pretraining heads (196 patches, 75 masked, V=8192)
                                                # CPU: one tiny fp32 shape, ours through Triton's interpreter
Rows go to benchmarks/results/masked_lm_loss.jsonl, or DIR/ with `--out=DIR` (ms, peak MB; fwd and fwd+bwd);
`--shapes=beit_base_224` runs a subset of the GPU shapes. The fused path computes its gradients in the forward, so its
fwd time already contains most of the backward work.
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

GPU_SHAPES = [("beit_base_224", 256, 196, 768, 8192, 75), ("beit_large_224", 256, 196, 1024, 8192, 75)]
CPU_SHAPES = [("tiny_cpu", 2, 16, 32, 64, 6)]  # name, batch, patches, channels, vocab, masked per image
# Each provider takes (hidden, mask, weight, bias, labels, bound) with bound = batch × masked per image.
PROVIDERS = {
    "ours": lambda *args, bound: beit_kernels.masked_lm_loss(*args),  # GEMMs over all B·N rows
    "ours_bounded": lambda *args, bound: beit_kernels.masked_lm_loss(*args, max_masked=bound),  # over B·masked rows
    "torch": lambda *args, bound: beit_kernels.masked_lm_loss_ref(*args),  # lm_head(x[mask]) + F.cross_entropy
}


def call(provider, mode: str, shape, device: str, dtype: torch.dtype):
    """The timed callable of one (provider, mode, shape) and its row's shape fields (this script and the
    pytest-benchmark suite time the same)."""
    _, batch, tokens, channels, vocab, masked = shape
    hidden = torch.randn(batch, tokens, channels, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, channels, device=device) * channels**-0.5).to(dtype).requires_grad_()
    bias = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)
    mask = torch.rand(batch, tokens, device=device).argsort(dim=1) < masked  # exactly `masked` per image
    labels = torch.randint(0, vocab, (batch, tokens), device=device)
    bound = batch * masked
    if mode == "fwd":
        fn = lambda: provider(hidden, mask, weight, bias, labels, bound=bound)  # noqa: E731
    else:
        fn = lambda: provider(hidden, mask, weight, bias, labels, bound=bound)[0].backward()  # noqa: E731
    return fn, {"batch": batch, "tokens": tokens, "channels": channels, "vocab": vocab, "masked_per_image": masked}


def bench_one(provider, mode: str, shape, device: str, dtype: torch.dtype) -> dict:
    fn, info = call(provider, mode, shape, device, dtype)
    median, p20, p80 = measure_ms(fn, device)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "peak_mb": peak_memory_mb(fn, device), **info}


def main(argv: list[str] | None = None) -> None:
    args = parse_bench_args(argv, __doc__.splitlines()[0], GPU_SHAPES)
    device = "cpu" if ON_CPU else "cuda"
    dtype = torch.float32 if ON_CPU else torch.bfloat16
    env = environment(device)
    for shape in select_shapes(GPU_SHAPES, CPU_SHAPES, ON_CPU, args.shapes):
        for name, provider in PROVIDERS.items():
            for mode in ("fwd", "fwd+bwd"):
                base = {"bench": "masked_lm_loss", "shape": shape[0], "provider": name, "mode": mode,
                        "dtype": str(dtype).removeprefix("torch."), **env}
                row = measure_row(base, lambda: bench_one(provider, mode, shape, device, dtype),
                                  ON_CPU and name.startswith("ours"))
                append_rows("masked_lm_loss", [row], args.out)  # row by row: a timed-out run keeps its rows


if __name__ == "__main__":
    main(sys.argv[1:])

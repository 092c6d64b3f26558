"""Model-level benchmark: forward+backward of a BEiT pretraining model (block stack + masked LM loss) per attn_impl.
Every row uses the same loss (`MLM_LOSS`: the fused kernel on a GPU, the reference on a CPU), so rows compare
attention backends alone.

    python benchmarks/bench_block.py   # GPU: BEiT-B/L MIM at 224 with 4 blocks, bf16 autocast
                                       # CPU: a tiny 2-block model, triton path through the interpreter
Rows go to benchmarks/results/block.jsonl, or DIR/block.jsonl with `--out=DIR` (ms per step, images/s, peak MB);
`--shapes=beit_base_224_depth4` runs a subset of the GPU shapes.
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

import engine  # noqa: E402

GPU_SHAPES = [  # name, model, batch, overrides
    ("beit_base_224_depth4", "beit_base_patch16_224_8k_vocab", 64, {"depth": 4}),
    ("beit_large_224_depth4", "beit_large_patch16_224_8k_vocab", 64, {"depth": 4}),
]
CPU_SHAPES = [("tiny_cpu", "beit_tiny_patch4_32_8k_vocab", 2,
               {"img_size": 16, "depth": 2, "vocab_size": 64, "embed_dim": 64, "num_heads": 2})]
IMPLS = ("triton", "sdpa", "eager")
MLM_LOSS = "reference" if ON_CPU else "fused"


def call(attn_impl: str, shape, device: str):
    """One MIM training step's forward and backward (bf16 autocast on a GPU) and its row's fields (this script and
    the pytest-benchmark suite time the same)."""
    _, model_name, batch, overrides = shape
    model = engine.create_model(model_name, attn_impl=attn_impl, mlm_loss=MLM_LOSS, **overrides).to(device)
    side = model.patch_embed.patch_shape
    img_size = model.config["img_size"]
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    mask = torch.rand(batch, side[0] * side[1], device=device) < 0.4
    labels = torch.randint(0, model.config["vocab_size"], mask.shape, device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = model(images, mask, labels)
        loss.backward()

    return step, {"batch": batch, "model": model_name, **overrides}


def bench_one(attn_impl: str, shape, device: str) -> dict:
    step, info = call(attn_impl, shape, device)
    median, p20, p80 = measure_ms(step, device)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "images_per_s": info["batch"] / median * 1e3,
            "peak_mb": peak_memory_mb(step, device), **info}


def main(argv: list[str] | None = None) -> None:
    args = parse_bench_args(argv, __doc__.splitlines()[0], GPU_SHAPES)
    device = "cpu" if ON_CPU else "cuda"
    env = environment(device)
    for shape in select_shapes(GPU_SHAPES, CPU_SHAPES, ON_CPU, args.shapes):
        for attn_impl in IMPLS:
            base = {"bench": "block", "shape": shape[0], "provider": attn_impl, "mode": "fwd+bwd", "mlm_loss": MLM_LOSS,
                    "dtype": "float32" if ON_CPU else "bf16-autocast", **env}
            interpreted = ON_CPU and attn_impl == "triton"
            row = measure_row(base, lambda: bench_one(attn_impl, shape, device), interpreted)
            append_rows("block", [row], args.out)  # row by row: a timed-out run keeps its rows


if __name__ == "__main__":
    main(sys.argv[1:])

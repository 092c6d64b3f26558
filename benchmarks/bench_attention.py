"""Benchmark relative-position-bias attention: ours vs eager, SDPA(+bias mask), FlexAttention, SDPA-flash (no bias).

    python benchmarks/bench_attention.py            # GPU: BEiT-B/L at 224 (N=197) and 384 (N=577), bf16
                                                    # CPU: one tiny fp32 shape, ours through Triton's interpreter
    python benchmarks/bench_attention.py --shapes=beit_base_224,beit_large_224 --out=DIR
Rows go to benchmarks/results/attention.jsonl (or DIR/attention.jsonl). FLOPs: 4·B·H·N²·D forward, 2.5× that
backward, 3.5× fwd+bwd (flash-attn's convention; backward credits the recomputation). Every provider computes the
bias gradient except the no-bias ceilings (sdpa_flash_nobias, flash_attn).

Providers: ours (beit_kernels.rel_pos_attention), eager (the PyTorch reference without upcasting), sdpa_bias (SDPA with
the gathered bias as an additive mask, backend left to PyTorch's dispatcher), sdpa_mem_efficient_bias (the same,
pinned to the memory-efficient kernel: the fused SDPA kernel that takes and differentiates a bias), flex
(FlexAttention with a table-reading score_mod, torch.compile'd on CUDA), sdpa_flash_nobias and flash_attn (no bias:
the speed ceiling). On CPU the memory-efficient kernel and FlexAttention's backward do not exist; those rows record
the error.
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
import torch.nn.functional as F  # noqa: E402

import beit_kernels  # noqa: E402
from beit_kernels.rel_pos_bias import table_grad_plan  # noqa: E402
from engine.pos_embed import relative_position_index  # noqa: E402

GPU_SHAPES = [  # name, batch, heads, token grid side, head dim
    ("beit_base_224", 128, 12, 14, 64),
    ("beit_large_224", 128, 16, 14, 64),
    ("beit_base_384", 32, 12, 24, 64),
    ("beit_large_384", 32, 16, 24, 64),
]
CPU_SHAPES = [("tiny_cpu", 2, 2, 4, 32)]


def flex_provider(device: str):
    from torch.nn.attention.flex_attention import flex_attention

    attend = torch.compile(flex_attention) if device == "cuda" else flex_attention

    def run(q, k, v, table, index):
        def score_mod(score, batch, head, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], head]

        return attend(q, k, v, score_mod=score_mod)

    return run


def sdpa_bias(q, k, v, table, index):
    # [1, H, N, N], broadcast over the batch
    bias = beit_kernels.rel_pos_bias_ref(table, index).unsqueeze(0).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def sdpa_mem_efficient_bias(q, k, v, table, index):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return sdpa_bias(q, k, v, table, index)


def sdpa_flash_nobias(q, k, v, table, index):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def flash_attn_nobias(q, k, v, table, index):
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def ours(q, k, v, table, index):
    """As the model calls it: an int32 index and the table-gradient plan built once per index, not per call."""
    return beit_kernels.rel_pos_attention(q, k, v, table, index, plan=_plan(index, table.shape[0]))


_PLANS: dict = {}


def _plan(index, num_rows: int):
    key = (tuple(index.shape), num_rows, str(index.device))  # the BEiT index is fixed by its grid
    if key not in _PLANS:
        _PLANS[key] = table_grad_plan(index, num_rows)
    return _PLANS[key]


def providers(device: str) -> dict:
    found = {
        "ours": ours,
        "eager": lambda q, k, v, t, i: beit_kernels.rel_pos_attention_ref(q, k, v, t, i, upcast=False),
        "sdpa_bias": sdpa_bias,
        "sdpa_mem_efficient_bias": sdpa_mem_efficient_bias,
        "flex": flex_provider(device),
        "sdpa_flash_nobias": sdpa_flash_nobias,
    }
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            found["flash_attn"] = flash_attn_nobias
        except ImportError:
            pass
    return found


def call(provider, mode: str, shape, device: str, dtype: torch.dtype):
    """The timed callable of one (provider, mode, shape) and its row's shape fields: what this script and the
    pytest-benchmark suite (benchmarks/test_bench_kernels.py) both time."""
    _, batch, heads, side, head_dim = shape
    index = relative_position_index((side, side)).to(device, torch.int32)  # the model's buffer dtype
    tokens = index.shape[0]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    table = torch.randn(int(index.max()) + 1, heads, device=device, requires_grad=True)
    grad_out = torch.randn_like(q)
    if mode == "fwd":
        fn = lambda: provider(q, k, v, table, index)  # noqa: E731
    elif mode == "bwd":
        out = provider(q, k, v, table, index)
        fn = lambda: out.backward(grad_out, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: provider(q, k, v, table, index).backward(grad_out)  # noqa: E731
    return fn, {"batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim}


def flop(mode: str, batch: int, heads: int, tokens: int, head_dim: int) -> float:
    return 4 * batch * heads * tokens**2 * head_dim * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def bench_one(provider, mode: str, shape, device: str, dtype: torch.dtype) -> dict:
    fn, info = call(provider, mode, shape, device, dtype)
    median, p20, p80 = measure_ms(fn, device)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "tflops": flop(mode, **info) / median / 1e9,
            "peak_mb": peak_memory_mb(fn, device), **info}


def main(argv: list[str] | None = None) -> None:
    args = parse_bench_args(argv, __doc__.splitlines()[0], GPU_SHAPES)
    device = "cpu" if ON_CPU else "cuda"
    dtype = torch.float32 if ON_CPU else torch.bfloat16
    env = environment(device)
    for shape in select_shapes(GPU_SHAPES, CPU_SHAPES, ON_CPU, args.shapes):
        for name, provider in providers(device).items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                base = {"bench": "attention", "shape": shape[0], "provider": name, "mode": mode,
                        "dtype": str(dtype).removeprefix("torch."), **env}
                row = measure_row(base, lambda: bench_one(provider, mode, shape, device, dtype),
                                  ON_CPU and name == "ours")
                append_rows("attention", [row], args.out)  # row by row: a timed-out run keeps its rows


if __name__ == "__main__":
    main(sys.argv[1:])

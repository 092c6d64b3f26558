"""Benchmark relative-position-bias attention: ours vs eager, SDPA(+bias mask), FlexAttention, SDPA-flash (no bias).

    python benchmarks/bench_attention.py            # GPU: BEiT-B/L at 224 (N=197) and 384 (N=577), bf16
                                                    # CPU: one tiny fp32 shape, ours through Triton's interpreter
Rows go to benchmarks/results/attention.jsonl. FLOPs: 4·B·H·N²·D forward, 2.5× that backward, 3.5× fwd+bwd
(flash-attn's convention; backward credits the recomputation). Every provider computes the bias gradient except
the no-bias ceilings (sdpa_flash_nobias, flash_attn).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_rows, environment, measure_ms, measure_row, peak_memory_mb, use_interpreter_on_cpu  # noqa: E402

ON_CPU = use_interpreter_on_cpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
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


def sdpa_flash_nobias(q, k, v, table, index):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def flash_attn_nobias(q, k, v, table, index):
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def providers(device: str) -> dict:
    found = {
        "ours": kernels.rel_pos_attention,
        "eager": lambda q, k, v, t, i: kernels.rel_pos_attention_ref(q, k, v, t, i, upcast=False),
        "sdpa_bias": lambda q, k, v, t, i: F.scaled_dot_product_attention(
            q, k, v, attn_mask=kernels.rel_pos_bias_ref(t, i).unsqueeze(0).to(q.dtype)),
        "flex": flex_provider(device),
    }
    if device == "cuda":
        found["sdpa_flash_nobias"] = sdpa_flash_nobias
        try:
            import flash_attn  # noqa: F401

            found["flash_attn"] = flash_attn_nobias
        except ImportError:
            pass
    return found


def bench_one(provider, mode: str, shape, device: str, dtype: torch.dtype) -> dict:
    _, batch, heads, side, head_dim = shape
    index = relative_position_index((side, side)).to(device)
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
    median, p20, p80 = measure_ms(fn, device)
    flops = 4 * batch * heads * tokens**2 * head_dim * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "tflops": flops / median / 1e9,
            "peak_mb": peak_memory_mb(fn, device), "batch": batch, "heads": heads, "tokens": tokens,
            "head_dim": head_dim}


def main() -> None:
    device = "cpu" if ON_CPU else "cuda"
    dtype = torch.float32 if ON_CPU else torch.bfloat16
    env = environment(device)
    rows = []
    for shape in CPU_SHAPES if ON_CPU else GPU_SHAPES:
        for name, provider in providers(device).items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                base = {"bench": "attention", "shape": shape[0], "provider": name, "mode": mode,
                        "dtype": str(dtype).removeprefix("torch."), **env}
                rows.append(measure_row(base, lambda: bench_one(provider, mode, shape, device, dtype),
                                        ON_CPU and name == "ours"))
    append_rows("attention", rows)


if __name__ == "__main__":
    main()

"""pytest-benchmark suite of the kernels: the bench_*.py scripts' own cases (their shapes, providers and timed
callables, `call`), kept and compared by pytest-benchmark instead of JSONL rows.

    pytest benchmarks --benchmark-only                        # GPU: BEiT-B/L shapes, bf16; CPU: tiny fp32 shapes
    pytest benchmarks --benchmark-only --benchmark-autosave   # saves the run under .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare    # compares against the last saved run
    pytest benchmarks --benchmark-only --benchmark-json=run.json && pytest-benchmark compare run.json

Groups put the providers of one comparison side by side (e.g. "attention fwd+bwd bias beit_large"). On a GPU the
first call (Triton autotuning) runs before the timing, every timed call ends with a device synchronisation, and
pytest-benchmark calibrates the rounds (its --benchmark-min-rounds/--benchmark-max-time options apply). On CPU our
kernels run through Triton's interpreter (benchmarks/conftest.py): a fixed 3 rounds that show the code runs, not a
speed figure.
"""

import pytest
import torch

from benchmarks import bench_attention, bench_block, bench_masked_lm_loss, bench_rel_pos_bias
from benchmarks.common import select_shapes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CPU_ROUNDS = 3
GPU_SHAPES = "beit_base_224,beit_large_224"  # the 224 px shapes of each script (their --shapes)


def shapes(module, names: str = GPU_SHAPES) -> dict:
    """The script's shapes this suite runs: its tiny CPU shape, or its BEiT-B/L 224 px GPU shapes."""
    return {shape[0]: shape for shape in select_shapes(module.GPU_SHAPES, module.CPU_SHAPES, not CUDA,
                                                       names.split(","))}


def run_benchmark(benchmark, fn, group: str, **info) -> None:
    """Time `fn` in `group` (synchronised on CUDA, after one untimed call), with `info` in the saved JSON."""
    benchmark.group = group
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE).removeprefix("torch."), **info)
    if not CUDA:
        benchmark.pedantic(fn, rounds=CPU_ROUNDS, warmup_rounds=1, iterations=1)
        return

    def synchronised():
        fn()
        torch.cuda.synchronize()

    synchronised()  # autotuning and compilation stay out of the timing
    benchmark(synchronised)


ATTENTION = shapes(bench_attention)


@pytest.mark.parametrize("provider", ["ours", "sdpa_bias", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(ATTENTION))
def test_attention(benchmark, shape, mode, provider):
    fn, info = bench_attention.call(bench_attention.providers(DEVICE)[provider], mode, ATTENTION[shape], DEVICE,
                                    DTYPE)
    run_benchmark(benchmark, fn, f"attention {mode} {shape}", provider=provider,
                  flop=bench_attention.flop(mode, **info), **info)


REL_POS_BIAS = shapes(bench_rel_pos_bias)


@pytest.mark.parametrize("provider", list(bench_rel_pos_bias.PROVIDERS))
@pytest.mark.parametrize("shape", list(REL_POS_BIAS))
def test_rel_pos_bias(benchmark, shape, provider):
    fn, info, _ = bench_rel_pos_bias.call(bench_rel_pos_bias.PROVIDERS[provider], "fwd+bwd", REL_POS_BIAS[shape],
                                          DEVICE)
    run_benchmark(benchmark, fn, f"rel_pos_bias fwd+bwd {shape}", provider=provider, **info)


MASKED_LM_LOSS = shapes(bench_masked_lm_loss)


@pytest.mark.parametrize("provider", ["ours_bounded", "torch"])
@pytest.mark.parametrize("shape", list(MASKED_LM_LOSS))
def test_masked_lm_loss(benchmark, shape, provider):
    """The fused loss with the trainer's bound (max_masked = B × masked per image) vs lm_head + cross-entropy."""
    fn, info = bench_masked_lm_loss.call(bench_masked_lm_loss.PROVIDERS[provider], "fwd+bwd", MASKED_LM_LOSS[shape],
                                         DEVICE, DTYPE)
    run_benchmark(benchmark, fn, f"masked_lm_loss fwd+bwd {shape}", provider=provider, **info)


BLOCK = shapes(bench_block, "beit_base_224_depth4,beit_large_224_depth4")


@pytest.mark.parametrize("attn_impl", list(bench_block.IMPLS))
@pytest.mark.parametrize("shape", list(BLOCK))
def test_block(benchmark, shape, attn_impl):
    """A small MIM model's training step per attention backend (bf16 autocast on a GPU)."""
    fn, info = bench_block.call(attn_impl, BLOCK[shape], DEVICE)
    run_benchmark(benchmark, fn, f"block fwd+bwd {shape}", provider=attn_impl, **info)

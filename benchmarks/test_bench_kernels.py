"""pytest-benchmark suite of the kernels: the same comparisons as the bench_*.py scripts, kept and compared by
pytest-benchmark instead of JSONL rows.

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
import torch.nn.functional as F

import engine
import kernels
from engine.pos_embed import relative_position_index

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CPU_ROUNDS = 3

# name: (batch, heads, token grid side, head dim, model width); N = side² + 1 (CLS)
ATTENTION_SHAPES = ({"beit_base": (128, 12, 14, 64, 768), "beit_large": (128, 16, 14, 64, 1024)} if CUDA
                    else {"tiny_cpu": (2, 2, 4, 32, 64)})
# name: (batch, patches, channels, vocab, masked per image)
MLM_SHAPES = ({"beit_base": (256, 196, 768, 8192, 75), "beit_large": (256, 196, 1024, 8192, 75)} if CUDA
              else {"tiny_cpu": (2, 16, 32, 64, 6)})
BLOCK_MODELS = {"beit_base": "beit_base_patch16_224", "beit_large": "beit_large_patch16_224"} if CUDA else {
    "tiny_cpu": "beit_tiny_patch4_32"}
TINY_BLOCK = {"img_size": 16, "embed_dim": 64, "num_heads": 2}  # 4×4 tokens + CLS on CPU


def sdpa_attention(q, k, v, table, index):
    mask = None if table is None else kernels.rel_pos_bias_ref(table, index).unsqueeze(0).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ATTENTION_PROVIDERS = {
    "triton": kernels.rel_pos_attention,
    "sdpa": sdpa_attention,
    "eager": lambda q, k, v, table, index: kernels.rel_pos_attention_ref(q, k, v, table, index, upcast=False),
}


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


def forward_or_both(make_output, mode: str, grad_of=None):
    """A callable running the forward (`fwd`) or forward and backward (`fwd+bwd`) of `make_output()`."""
    if mode == "fwd":
        return make_output
    return lambda: (grad_of or (lambda out: out.sum()))(make_output()).backward()


@pytest.mark.parametrize("provider", list(ATTENTION_PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_attention(benchmark, shape, bias, mode, provider):
    batch, heads, side, head_dim, _ = ATTENTION_SHAPES[shape]
    index = relative_position_index((side, side)).to(DEVICE)
    tokens = index.shape[0]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    table = torch.randn(int(index.max()) + 1, heads, device=DEVICE, requires_grad=True) if bias else None
    attend = ATTENTION_PROVIDERS[provider]
    grad_out = torch.randn_like(q)
    fn = forward_or_both(lambda: attend(q, k, v, table, index if bias else None), mode,
                         grad_of=lambda out: (out * grad_out).sum())
    flop = 4 * batch * heads * tokens**2 * head_dim * (3.5 if mode == "fwd+bwd" else 1.0)
    run_benchmark(benchmark, fn, f"attention {mode} {'bias' if bias else 'no bias'} {shape}", provider=provider,
                  batch=batch, heads=heads, tokens=tokens, head_dim=head_dim, flop=flop)


@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_rel_pos_bias(benchmark, shape, provider):
    _, heads, side, _, _ = ATTENTION_SHAPES[shape]
    index = relative_position_index((side, side)).to(DEVICE)
    table = torch.randn(int(index.max()) + 1, heads, device=DEVICE, requires_grad=True)
    gather = kernels.rel_pos_bias if provider == "triton" else kernels.rel_pos_bias_ref
    fn = forward_or_both(lambda: gather(table, index), "fwd+bwd")
    run_benchmark(benchmark, fn, f"rel_pos_bias fwd+bwd {shape}", provider=provider, heads=heads,
                  tokens=index.shape[0])


@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("shape", list(MLM_SHAPES))
def test_masked_lm_loss(benchmark, shape, provider):
    """The fused loss with the trainer's bound (max_masked = B × masked per image) vs lm_head + cross-entropy."""
    batch, tokens, channels, vocab, masked = MLM_SHAPES[shape]
    hidden = torch.randn(batch, tokens, channels, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(vocab, channels, device=DEVICE) * channels**-0.5).to(DTYPE).requires_grad_()
    bias = torch.zeros(vocab, device=DEVICE, dtype=DTYPE, requires_grad=True)
    mask = torch.rand(batch, tokens, device=DEVICE).argsort(dim=1) < masked  # exactly `masked` per image
    labels = torch.randint(0, vocab, (batch, tokens), device=DEVICE)
    if provider == "triton":
        loss = lambda: kernels.masked_lm_loss(hidden, mask, weight, bias, labels, max_masked=batch * masked)  # noqa: E731
    else:
        loss = lambda: kernels.masked_lm_loss_ref(hidden, mask, weight, bias, labels)  # noqa: E731
    fn = forward_or_both(lambda: loss()[0], "fwd+bwd")
    run_benchmark(benchmark, fn, f"masked_lm_loss fwd+bwd {shape}", provider=provider, batch=batch, tokens=tokens,
                  channels=channels, vocab=vocab, masked_per_image=masked)


@pytest.mark.parametrize("attn_impl", ["triton", "sdpa", "eager"])
@pytest.mark.parametrize("shape", list(BLOCK_MODELS))
def test_block(benchmark, shape, attn_impl):
    """One transformer block (its own relative position table, as in fine-tuning), bf16 autocast on a GPU."""
    overrides = {} if CUDA else TINY_BLOCK
    model = engine.create_model(BLOCK_MODELS[shape], depth=1, attn_impl=attn_impl, **overrides).to(DEVICE)
    block = model.blocks[0]
    side = model.patch_embed.patch_shape[0]
    batch = ATTENTION_SHAPES[shape][0]
    x = torch.randn(batch, side * side + 1, model.config["embed_dim"], device=DEVICE, requires_grad=True)

    def forward():
        with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            return block(x)

    run_benchmark(benchmark, forward_or_both(forward, "fwd+bwd"), f"block fwd+bwd {shape}", provider=attn_impl,
                  batch=batch, tokens=x.shape[1], width=x.shape[2])

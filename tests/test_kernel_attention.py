"""rel_pos_attention: outputs and q/k/v/table gradients against the float64 reference.

Tolerances follow flash-attn: the kernel's error against float64 must stay within 2× (forward) / 3× (gradients) of
PyTorch's own error at the same precision, plus a floor of a few units in the last place at the output's scale
(`FLOOR_ULPS`: 8 for fp32, where PyTorch can be exact and the kernel's summation order is not; 1 for half, so the
floor cannot hide a regression: at the CPU shapes the fp16 kernel errs ~1e-3 where PyTorch errs ~2-4e-3). CPU runs
go through Triton's interpreter at small shapes (fp32/fp16: the interpreter mis-computes bf16 dots); CUDA runs add
full shapes and bf16.
"""

import importlib

import pytest
import torch

import beit_kernels
from beit_kernels.rel_pos_attention import RelPosAttentionFunction, batch_groups, rel_pos_attention_ref
from beit_kernels.rel_pos_bias import table_grad_plan
from engine.pos_embed import relative_position_index

rel_pos_attention_module = importlib.import_module("beit_kernels.rel_pos_attention")  # the module, not the function
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def cuda_only(test):
    """Marked `cuda` (what `pytest -m cuda` and benchmarks/gpu_check.py select) and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


FLOOR_ULPS = {torch.float32: 8, torch.float16: 1, torch.bfloat16: 1}


def make_case(batch, heads, tokens, head_dim, dtype, index_kind="random", grid=None):
    """q, k, v (requires grad), an fp32 table and an `[N, N]` index."""
    if index_kind == "beit":
        index = relative_position_index(grid)  # BEiT: N = h·w + 1 with CLS
        tokens = index.shape[0]
    else:
        index = torch.randint(0, 2 * tokens + 3, (tokens, tokens))
    num_rows = int(index.max()) + 1
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=DEVICE, dtype=dtype).requires_grad_()
               for _ in range(3))
    table = (torch.randn(num_rows, heads, device=DEVICE) * 2).requires_grad_()
    return q, k, v, table, index.to(DEVICE)


def attention_and_grads(fn, q, k, v, table, index, grad_out, **kwargs):
    inputs = [t for t in (q, k, v, table) if t is not None]
    out = fn(q, k, v, table, index, **kwargs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in kernel result"
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(q, k, v, table, index):
    grad_out = torch.randn_like(q)
    out, grads = attention_and_grads(beit_kernels.rel_pos_attention, q, k, v, table, index, grad_out)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, table)]
    out64, grads64 = attention_and_grads(rel_pos_attention_ref, *leaves64, index, grad_out.double())
    leaves_low = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, table)]
    out_low, grads_low = attention_and_grads(rel_pos_attention_ref, *leaves_low, index, grad_out,
                                             upcast=False, reorder_ops=True)
    floor = FLOOR_ULPS[q.dtype] * torch.finfo(q.dtype).eps * out64.abs().max().item()
    assert max_error(out, out64) <= 2 * max_error(out_low, out64) + floor, "forward"
    names = ["dq", "dk", "dv", "dtable"]
    for name, grad, grad64, grad_low in zip(names, grads, grads64, grads_low):
        error, torch_error = max_error(grad, grad64), max_error(grad_low, grad64)
        assert error <= 3 * torch_error + floor, f"{name}: kernel error {error:.3g} vs torch {torch_error:.3g}"


@pytest.mark.parametrize(
    "batch, heads, tokens, head_dim",
    [(1, 1, 1, 32), (2, 2, 17, 32), (1, 2, 64, 64), (2, 1, 17, 80)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_random_index(batch, heads, tokens, head_dim, dtype):
    check_against_reference(*make_case(batch, heads, tokens, head_dim, dtype))


@pytest.mark.slow
def test_matches_reference_beit_index_n197():
    check_against_reference(*make_case(1, 2, 0, 32, torch.float32, "beit", grid=(14, 14)))


@pytest.mark.parametrize("sm_count", [1, 2, 64])
def test_beit_index_small_grid_any_batch_grouping(sm_count, monkeypatch):
    """The bias gradient is summed over batch groups (G = 1, 2 of 3 batches unevenly, and G = B): all exact."""
    monkeypatch.setattr(rel_pos_attention_module, "device_sm_count", lambda device: sm_count)
    check_against_reference(*make_case(3, 2, 0, 32, torch.float32, "beit", grid=(4, 4)))


def test_batch_groups_fill_the_device_and_no_more():
    assert batch_groups(batch=128, heads=16, tokens=197, sm_count=132) == 5  # 4 key blocks × 16 heads × 5 ≥ 264
    assert batch_groups(batch=2, heads=16, tokens=197, sm_count=132) == 2  # never more groups than batches
    assert batch_groups(batch=128, heads=12, tokens=197, sm_count=108) == 5


def test_plain_attention_without_table():
    q, k, v, _, _ = make_case(2, 2, 17, 32, torch.float32)
    check_against_reference(q, k, v, None, None)


def test_non_contiguous_qkv_from_packed_projection():
    batch, heads, tokens, head_dim = 2, 2, 17, 32
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=DEVICE).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
    q, k, v = (t.requires_grad_() for t in qkv.unbind(0))
    _, _, _, table, index = make_case(batch, heads, tokens, head_dim, torch.float32)
    check_against_reference(q, k, v, table, index)


def test_table_grad_is_bitwise_repeatable():
    q, k, v, table, index = make_case(3, 2, 17, 32, torch.float32)
    grad_out = torch.randn_like(q)
    runs = [attention_and_grads(beit_kernels.rel_pos_attention, q, k, v, table, index, grad_out)[1][3]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_every_output_element_is_written(monkeypatch):
    """Poison every buffer the launchers allocate with NaN: unwritten elements would surface as NaN."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    q, k, v, table, index = make_case(2, 2, 17, 80, torch.float32)
    out, grads = attention_and_grads(beit_kernels.rel_pos_attention, q, k, v, table, index, torch.ones_like(q))
    for tensor in (out, *grads):
        assert not torch.isnan(tensor).any()


def test_functional_matches_function_apply():
    q, k, v, table, index = make_case(1, 2, 17, 32, torch.float32)
    functional = beit_kernels.rel_pos_attention(q, k, v, table, index, scale=0.3)
    applied = RelPosAttentionFunction.apply(q, k, v, table, index, *table_grad_plan(index, table.shape[0]), 0.3)
    assert torch.equal(functional, applied)


def test_half_inputs_with_fp32_table_give_fp32_table_grad():
    q, k, v, table, index = make_case(1, 1, 17, 32, torch.float16)
    out = beit_kernels.rel_pos_attention(q, k, v, table, index)
    (grad_table,) = torch.autograd.grad(out.float().sum(), [table])
    assert out.dtype == torch.float16 and grad_table.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"q_shape": (2, 2, 5, 32), "k_shape": (2, 2, 6, 32)}, "must all be"),
        ({"index_shape": (4, 4)}, "rel_index must be"),
        ({"table_shape": (9, 3)}, "bias_table must be"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, message):
    q = torch.randn(kwargs.get("q_shape", (2, 2, 5, 32)))
    k = torch.randn(kwargs.get("k_shape", (2, 2, 5, 32)))
    table = torch.randn(kwargs.get("table_shape", (9, 2)))
    index = torch.zeros(kwargs.get("index_shape", (5, 5)), dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        beit_kernels.rel_pos_attention(q, k, q, table, index)


def test_cpu_without_interpreter_is_an_error_naming_the_fix(monkeypatch):
    """Never a silent switch to the reference: the kernel is what the caller asked for."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, table, index = (t.detach().cpu() for t in make_case(1, 2, 17, 32, torch.float32))
    with pytest.raises(RuntimeError, match="rel_pos_attention runs Triton kernels and got a cpu tensor.*_ref on CPU"):
        beit_kernels.rel_pos_attention(q, k, v, table, index)


def test_torch_compile_traces_custom_ops():
    """aot_eager exercises dynamo + fake kernels + autograd without needing a C++ compile."""
    q, k, v, table, index = make_case(1, 2, 17, 32, torch.float32)
    compiled = torch.compile(beit_kernels.rel_pos_attention, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, table, index)
    torch.testing.assert_close(out, beit_kernels.rel_pos_attention(q, k, v, table, index))
    out.sum().backward()
    assert table.grad is not None and torch.isfinite(table.grad).all()


@cuda_only
@pytest.mark.slow  # 8 (head dim, dtype) pairs, each autotuned afresh: gpu_check runs it last, in what time is left
@pytest.mark.parametrize("tokens", [197, 577, 1025])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_shapes_cuda(tokens, head_dim, dtype):
    check_against_reference(*make_case(4, 6, tokens, head_dim, dtype))


@cuda_only
@pytest.mark.parametrize("heads", [12, 16], ids=["beit_base", "beit_large"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_beit_224_cuda(heads, dtype):
    """BEiT-B/L attention at 224 px: N = 197 (14×14 + CLS), D = 64, the table gradient included."""
    check_against_reference(*make_case(8, heads, 0, 64, dtype, "beit", grid=(14, 14)))


OFFSETS_BEYOND_INT32 = """
import torch, beit_kernels
from beit_kernels.rel_pos_attention import rel_pos_attention_ref
batch, heads, tokens, head_dim, stride_b = 3, 2, 17, 16, 2**30  # batch 2 starts at element 2**31
storage = torch.empty(2 * stride_b + 3 * heads * tokens * head_dim, dtype=torch.float16)  # virtual; few pages touched
q, k, v = (storage.as_strided((batch, heads, tokens, head_dim), (stride_b, tokens * head_dim, head_dim, 1),
                              offset * heads * tokens * head_dim) for offset in range(3))
for t in (q, k, v):
    t.copy_(torch.randn(t.shape, dtype=torch.float16))
table, index = torch.randn(40, heads), torch.randint(0, 40, (tokens, tokens))
out = beit_kernels.rel_pos_attention(q, k, v, table, index)
expected = rel_pos_attention_ref(*(t.contiguous() for t in (q, k, v)), table, index)
torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
print("ok")
"""


@pytest.mark.slow
def test_offsets_beyond_int32_address_the_right_elements():
    """q/k/v whose last batch starts 2³¹ elements in (a strided view of a mostly untouched 4 GB buffer): 32-bit
    offsets would wrap and read the wrong memory. In a subprocess, so that a wrap cannot crash the test session."""
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV

    env = dict(SUBPROCESS_ENV, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", OFFSETS_BEYOND_INT32], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_tuned_configs_are_candidates_and_the_autotuner_keeps_only_its_arch(monkeypatch):
    """Each arch's list is a subset of the candidates the full AOT sweep compiles; the autotuner's early prune keeps
    the running arch's list (sm_86/89/100 take sm_80's)."""
    from beit_kernels.rel_pos_attention import TUNED_CONFIGS, _bwd_configs, _fwd_configs, _prune_to_arch

    def key(config):
        return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages

    candidates = {"_fwd_kernel": _fwd_configs(), "_bwd_dq_kernel": _fwd_configs(), "_bwd_dkdv_kernel": _bwd_configs()}
    for kernel, arch, head_dim in [(k, a, d) for k in candidates for a in (80, 90) for d in (64, 128)]:
        tuned = TUNED_CONFIGS[(kernel, arch, head_dim)]
        assert tuned and set(tuned) <= {key(c) for c in candidates[kernel]}, (kernel, arch, head_dim)
    for capability, arch in [((9, 0), 90), ((8, 0), 80), ((8, 9), 80), ((10, 0), 80)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        kept = _prune_to_arch("_bwd_dq_kernel")(_fwd_configs(), {}, HEAD_DIM=64)
        assert [key(c) for c in kept] == [c for c in map(key, _fwd_configs())
                                          if c in TUNED_CONFIGS[("_bwd_dq_kernel", arch, 64)]]

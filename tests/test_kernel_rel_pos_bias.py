"""rel_pos_bias: Triton gather and deterministic table gradient against the PyTorch reference."""

import pytest
import torch

import beit_kernels
from beit_kernels.rel_pos_bias import RelPosBiasFunction, table_grad_plan
from engine.pos_embed import relative_position_index

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def cuda_only(test):
    """Marked `cuda` (what `pytest -m cuda` and benchmarks/gpu_check.py select) and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


@pytest.mark.parametrize("index_kind", ["beit", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_matches_reference(index_kind, dtype):
    index = relative_position_index((7, 9)) if index_kind == "beit" else torch.randint(0, 40, (33, 33))
    check_against_reference(index.to(DEVICE), heads=3, dtype=dtype)


@cuda_only
@pytest.mark.parametrize("heads", [12, 16], ids=["beit_base", "beit_large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_beit_224_cuda(heads, dtype):
    """BEiT-B/L at 224 px: a 14×14 grid + CLS (N = 197, 732 table rows)."""
    check_against_reference(relative_position_index((14, 14)).to(DEVICE), heads=heads, dtype=dtype)


def check_against_reference(index: torch.Tensor, heads: int, dtype: torch.dtype) -> None:
    """The gather is exact; the table gradient matches the float64 one (half precision: to 2% of its largest entry)."""
    table = torch.randn(int(index.max()) + 1, heads, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = beit_kernels.rel_pos_bias(table, index)
    reference = beit_kernels.rel_pos_bias_ref(table, index)
    assert torch.equal(bias, reference)  # a gather is exact
    grad = torch.randn_like(bias)
    (dtable,) = torch.autograd.grad(bias, table, grad)
    (dtable64,) = torch.autograd.grad(beit_kernels.rel_pos_bias_ref(table.double(), index), table, grad.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * dtable64.abs().max().item()
    torch.testing.assert_close(dtable.double(), dtable64.double(), atol=tolerance, rtol=1e-3)


def test_table_grad_is_bitwise_repeatable_and_fills_unused_rows():
    index = torch.randint(0, 20, (17, 17), device=DEVICE)
    table = torch.randn(30, 4, device=DEVICE, requires_grad=True)  # rows 20..29 never indexed
    grad = torch.randn(4, 17, 17, device=DEVICE)
    runs = [torch.autograd.grad(beit_kernels.rel_pos_bias(table, index), table, grad)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.count_nonzero(runs[0][20:]) == 0


def test_functional_matches_function_apply():
    index = relative_position_index((4, 4)).to(DEVICE)
    table = torch.randn(int(index.max()) + 1, 2, device=DEVICE)
    plan = table_grad_plan(index, table.shape[0])
    assert torch.equal(beit_kernels.rel_pos_bias(table, index), RelPosBiasFunction.apply(table, index, *plan))


def test_a_precomputed_plan_gives_the_same_bias_and_gradient():
    """The model builds the table-gradient plan once per index; with it the result is bitwise the same."""
    index = relative_position_index((4, 5)).to(DEVICE)
    table = torch.randn(int(index.max()) + 1, 3, device=DEVICE, requires_grad=True)
    grad = torch.randn(3, *index.shape, device=DEVICE)
    plan = table_grad_plan(index, table.shape[0])
    for with_plan in (beit_kernels.rel_pos_bias(table, index, plan), beit_kernels.rel_pos_bias(table, index)):
        torch.testing.assert_close(with_plan, beit_kernels.rel_pos_bias(table, index), rtol=0, atol=0)
    grads = [torch.autograd.grad(beit_kernels.rel_pos_bias(table, index, p), table, grad)[0] for p in (plan, None)]
    assert torch.equal(grads[0], grads[1])


def test_bad_input_raises_clear_error():
    with pytest.raises(ValueError, match="bias_table must be"):
        beit_kernels.rel_pos_bias(torch.randn(5), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rel_index must be"):
        beit_kernels.rel_pos_bias(torch.randn(5, 2), torch.zeros(3, 3))

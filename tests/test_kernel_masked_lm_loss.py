"""masked_lm_loss: loss, accuracy and hidden/weight/bias gradients against the float64 reference."""

import pytest
import torch

import beit_kernels
from beit_kernels.masked_lm_loss import MaskedLMLossFunction

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def cuda_only(test):
    """Marked `cuda` (what `pytest -m cuda` and benchmarks/gpu_check.py select) and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


FLOOR = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_case(batch, tokens, channels, vocab, dtype, mask_ratio, with_bias=True):
    hidden = torch.randn(batch, tokens, channels, device=DEVICE, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, channels, device=DEVICE) * channels**-0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, device=DEVICE, dtype=dtype).requires_grad_() if with_bias else None
    mask = torch.rand(batch, tokens, device=DEVICE) < mask_ratio
    labels = torch.randint(0, vocab, (batch, tokens), device=DEVICE)
    labels[~mask] = -1  # never read: an out-of-range label at an unmasked position must not matter
    return hidden, mask, weight, bias, labels


def loss_and_grads(fn, hidden, mask, weight, bias, labels):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    loss, accuracy = fn(hidden, mask, weight, bias, labels)
    return loss, accuracy, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in kernel result"
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(hidden, mask, weight, bias, labels):
    loss, accuracy, grads = loss_and_grads(beit_kernels.masked_lm_loss, hidden, mask, weight, bias, labels)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss64, accuracy64, grads64 = loss_and_grads(beit_kernels.masked_lm_loss_ref, leaves64[0], mask, leaves64[1],
                                                 leaves64[2], labels)
    leaves_low = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss_low, _, grads_low = loss_and_grads(beit_kernels.masked_lm_loss_ref, leaves_low[0], mask, leaves_low[1],
                                            leaves_low[2], labels)
    floor = FLOOR[hidden.dtype]
    assert max_error(loss, loss64) <= 2 * max_error(loss_low, loss64) + floor
    assert accuracy.item() == pytest.approx(accuracy64.item(), abs=1.5 / max(int(mask.sum()), 1))
    for name, grad, grad64, grad_low in zip(["hidden", "weight", "bias"], grads, grads64, grads_low):
        error, torch_error = max_error(grad, grad64), max_error(grad_low, grad64)
        assert error <= 3 * torch_error + floor, f"d{name}: kernel error {error:.3g} vs torch {torch_error:.3g}"


@pytest.mark.parametrize(
    "batch, tokens, channels, vocab, mask_ratio",
    [(2, 17, 32, 50, 0.4), (1, 16, 32, 64, 0.75), (3, 9, 16, 33, 1.0), (1, 1, 32, 7, 1.0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(batch, tokens, channels, vocab, mask_ratio, dtype):
    check_against_reference(*make_case(batch, tokens, channels, vocab, dtype, mask_ratio))


def test_without_bias():
    check_against_reference(*make_case(2, 17, 32, 50, torch.float32, 0.5, with_bias=False))


def test_several_chunks_and_large_vocab_blocks():
    """vocab ≫ channels makes chunks of a few rows, so chunk edges fall inside the masked rows."""
    check_against_reference(*make_case(2, 20, 16, 300, torch.float32, 0.6))


def test_zero_masked_tokens_give_zero_loss_and_gradients():
    hidden, mask, weight, bias, labels = make_case(2, 17, 32, 50, torch.float32, 0.0)
    loss, accuracy, grads = loss_and_grads(beit_kernels.masked_lm_loss, hidden, mask, weight, bias, labels)
    assert loss.item() == 0.0 and accuracy.item() == 0.0
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


def test_accuracy_counts_argmax_hits():
    hidden, mask, weight, bias, labels = make_case(2, 17, 32, 50, torch.float32, 0.5)
    logits = hidden @ weight.t() + bias
    labels = torch.where(mask, logits.argmax(-1), labels)  # every masked token predicted right
    _, accuracy = beit_kernels.masked_lm_loss(hidden, mask, weight, bias, labels)
    assert accuracy.item() == 1.0


def test_out_of_range_label_at_masked_position_gives_nan_loss():
    hidden, mask, weight, bias, labels = make_case(1, 8, 16, 10, torch.float32, 1.0)
    labels[0, 3] = 10
    loss, _ = beit_kernels.masked_lm_loss(hidden, mask, weight, bias, labels)
    assert torch.isnan(loss)


def test_every_gradient_element_is_written(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    hidden, mask, weight, bias, labels = make_case(2, 17, 32, 50, torch.float32, 0.4)
    loss, accuracy, grads = loss_and_grads(beit_kernels.masked_lm_loss, hidden, mask, weight, bias, labels)
    for tensor in (loss, accuracy, *grads):
        assert not torch.isnan(tensor).any()


def test_functional_matches_function_apply():
    case = make_case(2, 17, 32, 50, torch.float32, 0.4)
    assert torch.equal(beit_kernels.masked_lm_loss(*case)[0], MaskedLMLossFunction.apply(*case)[0])


def test_cpu_without_interpreter_is_an_error_naming_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, mask, weight, bias, labels = (t.detach().cpu() for t in make_case(2, 17, 32, 50, torch.float32, 0.4))
    with pytest.raises(RuntimeError, match="masked_lm_loss runs Triton kernels and got a cpu tensor.*_ref on CPU"):
        beit_kernels.masked_lm_loss(hidden, mask, weight, bias, labels)


def test_bad_shapes_raise_clear_error():
    hidden, mask, weight, bias, labels = make_case(2, 17, 32, 50, torch.float32, 0.4)
    with pytest.raises(ValueError, match="weight must be"):
        beit_kernels.masked_lm_loss(hidden, mask, weight[:, :16], bias, labels)
    with pytest.raises(ValueError, match="bool_masked_pos and labels"):
        beit_kernels.masked_lm_loss(hidden, mask[:, :5], weight, bias, labels)


@cuda_only
@pytest.mark.parametrize("channels", [768, 1024], ids=["beit_base", "beit_large"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_beit_shapes_cuda(channels, dtype):
    """BEiT-B/L pretraining heads: 196 patches, ~75 masked, 8192 visual tokens."""
    check_against_reference(*make_case(16, 196, channels, 8192, dtype, 75 / 196))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_beit_shapes_with_the_trainers_bound_cuda(dtype):
    """The trainer passes max_masked = B × 75 (GEMMs over the masked rows only): same loss and gradients."""
    hidden, mask, weight, bias, labels = make_case(16, 196, 768, 8192, dtype, 1.0)
    mask = torch.rand(16, 196, device=DEVICE).argsort(dim=1) < 75  # exactly 75 per image, as the masking generator
    bounded = lambda *args: beit_kernels.masked_lm_loss(*args, max_masked=16 * 75)  # noqa: E731
    loss, accuracy, grads = loss_and_grads(bounded, hidden, mask, weight, bias, labels)
    loss_ref, accuracy_ref, grads_ref = loss_and_grads(beit_kernels.masked_lm_loss, hidden, mask, weight, bias, labels)
    torch.testing.assert_close(loss, loss_ref)
    assert accuracy.item() == accuracy_ref.item()
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


def test_max_masked_bound_limits_rows_and_matches_reference():
    hidden, mask, weight, bias, labels = make_case(3, 17, 32, 50, torch.float32, 0.4)
    bound = int(mask.sum()) + 2  # a static bound the count never exceeds, like B × num_masking_patches
    bounded = lambda *args: beit_kernels.masked_lm_loss(*args, max_masked=bound)  # noqa: E731
    loss, accuracy, grads = loss_and_grads(bounded, hidden, mask, weight, bias, labels)
    loss_ref, accuracy_ref, grads_ref = loss_and_grads(beit_kernels.masked_lm_loss, hidden, mask, weight, bias, labels)
    torch.testing.assert_close(loss, loss_ref)
    assert accuracy.item() == accuracy_ref.item()
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


def test_max_masked_below_the_count_fails_instead_of_a_wrong_loss():
    hidden, mask, weight, bias, labels = make_case(2, 17, 32, 50, torch.float32, 1.0)
    with pytest.raises(RuntimeError, match="more masked tokens than max_masked"):
        loss, _ = beit_kernels.masked_lm_loss(hidden, mask, weight, bias, labels, max_masked=5)
        loss.item()


@cuda_only
def test_grad_weight_products_are_not_rounded_to_bf16_cuda():
    """Each chunk's dlogitsᵀ @ x comes out of the GEMM in fp32: as close to the fp32 product of the same bf16 inputs
    as fp32 accumulation order allows, far closer than a bf16-rounded product."""
    from beit_kernels.masked_lm_loss import _matmul_fp32

    a, b = (torch.randn(512, 1024, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    exact = a.t().double() @ b.double()
    product = _matmul_fp32(a.t(), b)
    assert product.dtype == torch.float32
    error, rounded_error = ((t.double() - exact).abs().max().item() for t in (product, (a.t() @ b).float()))
    assert error < rounded_error / 10

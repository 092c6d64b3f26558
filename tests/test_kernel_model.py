"""A tiny BEiT trained a few steps with attn_impl="triton" and "eager" from one init gives the same losses."""

import pytest
import torch

import engine

CUDA = torch.cuda.is_available()


def cuda_only(test):
    """Marked `cuda` (what `pytest -m cuda` and benchmarks/gpu_check.py select) and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


def tiny_beit(attn_impl: str) -> torch.nn.Module:
    """4×4 token grid + CLS (N = 17), 2 heads of 32, shared and per-layer relative position tables."""
    return engine.create_model("beit_tiny_patch4_32_8k_vocab", img_size=16, depth=2, vocab_size=64, embed_dim=64,
                               num_heads=2, use_rel_pos_bias=True, attn_impl=attn_impl)


def train_losses(attn_impl: str, state: dict, images, mask, labels, optimizer_name: str) -> list[float]:
    model = tiny_beit(attn_impl)
    model.load_state_dict(state)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer_name == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    for _ in range(3):
        loss, _ = model(images, mask, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_triton_and_eager_train_alike(optimizer_name):
    reference = tiny_beit("eager")
    with torch.no_grad():  # non-zero relative position tables so their gradients matter from step one
        for name, param in reference.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(std=0.5)
    state = reference.state_dict()
    images = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) < 0.5
    labels = torch.randint(0, 64, (2, 16))
    eager = train_losses("eager", state, images, mask, labels, optimizer_name)
    triton = train_losses("triton", state, images, mask, labels, optimizer_name)
    assert eager[-1] != eager[0]  # the steps did train
    torch.testing.assert_close(torch.tensor(triton), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def beit_loss_and_grads(model_name: str, attn_impl: str, state: dict, autocast: bool, inputs) -> tuple[float, dict]:
    """(loss, {parameter name: gradient}) of one forward+backward of a 2-block BEiT loaded with `state`."""
    model = engine.create_model(model_name, depth=2, attn_impl=attn_impl, max_masked_per_image=75,
                                mlm_loss="fused" if attn_impl == "triton" else "reference").cuda()
    model.load_state_dict(state)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = model(*inputs)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@cuda_only
@pytest.mark.parametrize("model_name", ["beit_base_patch16_224_8k_vocab", "beit_large_patch16_224_8k_vocab"],
                         ids=["beit_base", "beit_large"])
def test_triton_model_matches_eager_at_beit_shapes_cuda(model_name):
    """Full-width BEiT-B/L (2 blocks) at 224 px under bf16 autocast: attn_impl="triton" with the fused loss is as
    close to the fp32 eager model (loss and every gradient, relative position tables included) as the bf16 eager
    model is, within 3× (flash-attn's criterion)."""
    torch.manual_seed(0)
    reference = engine.create_model(model_name, depth=2, attn_impl="eager", mlm_loss="reference")
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(std=0.5)  # non-zero tables, so that their gradients matter
    state = reference.state_dict()
    inputs = (torch.randn(8, 3, 224, 224, device="cuda"), torch.rand(8, 196, device="cuda").argsort(dim=1) < 75,
              torch.randint(0, 8192, (8, 196), device="cuda"))
    loss32, grads32 = beit_loss_and_grads(model_name, "eager", state, False, inputs)
    loss_eager, grads_eager = beit_loss_and_grads(model_name, "eager", state, True, inputs)
    loss_triton, grads_triton = beit_loss_and_grads(model_name, "triton", state, True, inputs)
    assert abs(loss_triton - loss32) <= 3 * abs(loss_eager - loss32) + 1e-2
    assert grads_triton.keys() == grads32.keys()
    for name, grad32 in grads32.items():
        error, eager_error = relative_error(grads_triton[name], grad32), relative_error(grads_eager[name], grad32)
        assert error <= 3 * eager_error + 1e-3, f"{name}: triton {error:.3g} vs eager bf16 {eager_error:.3g}"

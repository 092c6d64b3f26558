"""A tiny BEiT trained a few steps with attn_impl="triton" and "eager" from one init gives the same losses."""

import pytest
import torch

import engine


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

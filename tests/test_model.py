"""BEiT model: registry, shapes, official init and index, backend equivalence, masking semantics, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

import beit_kernels
import engine.model
from engine.factory import create_model, list_models
from engine.model import BeitForImageClassification, BeitForMaskedImageModeling
from engine.pos_embed import num_relative_distance, relative_position_index

MIM = "beit_tiny_patch4_32_8k_vocab"
CLS = "beit_tiny_patch4_32"


@pytest.fixture(autouse=True)
def _pytorch_kernel_paths(monkeypatch):
    """Model tests check the model on CPU, interpreter off (the Triton interpreter would
    make every forward slow); `test_triton_kernels_run_inside_the_model` turns the interpreter back on."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _mask(batch: int = 2, num_patches: int = 64, ratio: float = 0.4) -> torch.Tensor:
    return torch.rand(batch, num_patches) < ratio  # [B, L]


def _randomise_tables(model: torch.nn.Module) -> None:
    """Tables start at zero, which would hide bias bugs: give every table (shared and per-layer) random values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(0.0, 0.5)


def _twin(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    """The same architecture and weights, with some constructor arguments changed."""
    twin = create_model(**{**model.config, **overrides})
    twin.load_state_dict(model.state_dict())
    return twin


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- registry and sizes


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds(name):
    with torch.device("meta"):  # no memory, no init cost: large models stay fast
        model = create_model(name)
    expected_cls = BeitForMaskedImageModeling if name.endswith("_vocab") else BeitForImageClassification
    assert isinstance(model, expected_cls)
    assert model.config["name"] == name
    img = model.config["img_size"]
    assert model.patch_embed.patch_shape == (img // model.config["patch_size"],) * 2


@pytest.mark.parametrize("name, millions", [("beit_base_patch16_224", 86.5), ("beit_large_patch16_224", 304.4)])
def test_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_official_parameter_names():
    names = set(create_model(MIM, depth=2, use_rel_pos_bias=True).state_dict())
    for key in ("patch_embed.proj.weight", "cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
                "blocks.0.attn.proj.weight", "blocks.0.attn.relative_position_bias_table", "blocks.1.norm2.bias",
                "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "blocks.1.gamma_1", "blocks.1.gamma_2",
                "norm.weight", "lm_head.weight", "lm_head.bias"):
        assert key in names, key
    assert "blocks.0.attn.qkv.bias" not in names  # k has no bias: q_bias and v_bias only
    assert not any("relative_position_index" in key for key in names)  # non-persistent buffers
    classifier = set(create_model(CLS, depth=1).state_dict())
    assert {"fc_norm.weight", "head.weight", "head.bias", "blocks.0.attn.relative_position_bias_table"} <= classifier
    assert "pos_embed" in create_model(CLS, depth=1, use_abs_pos_emb=True).state_dict()


def test_config_round_trip_rebuilds_the_same_model():
    model = create_model(MIM, img_size=28, depth=3, attn_impl="eager", drop_path_rate=0.1)
    rebuilt = create_model(**model.config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.patch_embed.patch_shape == (7, 7)
    classifier = create_model(CLS, num_classes=10, use_mean_pooling=False)
    assert create_model(**classifier.config).config == classifier.config


def test_unknown_name_and_argument_are_clear_errors():
    with pytest.raises(ValueError, match="did you mean .*beit_base_patch16_224_8k_vocab"):
        create_model("beit_base_patch16_224_8k")
    with pytest.raises(ValueError, match="did you mean drop_path_rate"):
        create_model(MIM, drop_path=0.1)
    with pytest.raises(ValueError, match="num_classes"):  # a classification-only argument on a MIM model
        create_model(MIM, num_classes=10)
    with pytest.raises(ValueError, match="attn_impl"):
        create_model(MIM, attn_impl="flash")
    with pytest.raises(ValueError, match="divisible"):
        create_model(CLS, img_size=30)


def test_bad_inputs_are_clear_errors():
    model = create_model(MIM, depth=1)
    with pytest.raises(ValueError, match=r"img_size=\(28, 28\)"):
        model(_images(size=28), _mask())
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(_images(), _mask(num_patches=63))
    with pytest.raises(ValueError, match="labels"):
        model(_images(), _mask(), torch.zeros(2, 10, dtype=torch.long))


# ---------------------------------------------------------------- relative position index


def test_relative_position_index_matches_the_official_formula():
    height, width = 2, 3
    num_rows = (2 * height - 1) * (2 * width - 1) + 3
    positions = [(y, x) for y in range(height) for x in range(width)]  # row-major patches
    expected = torch.zeros(len(positions) + 1, len(positions) + 1, dtype=torch.long)
    for i, (yi, xi) in enumerate(positions, start=1):
        for j, (yj, xj) in enumerate(positions, start=1):
            expected[i, j] = (yi - yj + height - 1) * (2 * width - 1) + (xi - xj + width - 1)
    expected[0, :] = num_rows - 3
    expected[:, 0] = num_rows - 2
    expected[0, 0] = num_rows - 1
    assert num_relative_distance((height, width)) == num_rows == 18
    index = relative_position_index((height, width))
    assert index.dtype == torch.long
    assert torch.equal(index, expected)
    assert num_relative_distance((14, 14)) == 732 and relative_position_index((14, 14)).shape == (197, 197)


# ---------------------------------------------------------------- initialisation


def test_official_init():
    model = create_model(CLS, depth=4)
    assert all(torch.all(p == 0) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert torch.all(model.blocks[0].gamma_1 == 0.1)
    assert torch.all(model.fc_norm.weight == 1) and isinstance(model.norm, torch.nn.Identity)
    assert torch.all(model.blocks[3].attn.proj.bias == 0) and torch.all(model.blocks[3].attn.q_bias == 0)
    assert model.head.weight.std().item() == pytest.approx(0.02 * 1e-3, rel=0.1)  # init_scale 0.001
    mim = create_model(MIM, depth=1)
    assert mim.cls_token.abs().max() <= 0.02  # pretraining truncates at ±std
    assert mim.lm_head.weight.abs().max() <= 0.02
    assert torch.all(mim.lm_head.bias == 0)
    large = create_model("beit_large_patch16_224_8k_vocab", depth=1, embed_dim=64, num_heads=2, img_size=32)
    assert large.blocks[0].gamma_1[0].item() == pytest.approx(1e-5)


def test_fix_init_weight_divides_by_sqrt_2l():
    model = create_model(MIM, depth=6)
    for layer, block in enumerate(model.blocks, start=1):  # qkv is not rescaled, proj and fc2 are
        qkv_std = block.attn.qkv.weight.std().item()
        assert block.attn.proj.weight.std().item() == pytest.approx(qkv_std / math.sqrt(2 * layer), rel=0.05)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(qkv_std / math.sqrt(2 * layer), rel=0.05)
    before = [block.mlp.fc2.weight.clone() for block in model.blocks]
    model.fix_init_weight()
    for layer, (block, old) in enumerate(zip(model.blocks, before), start=1):
        torch.testing.assert_close(block.mlp.fc2.weight, old / math.sqrt(2 * layer))


# ---------------------------------------------------------------- masked image modelling


def test_mim_logits_are_lm_head_of_masked_tokens_in_row_major_order():
    model = create_model(MIM, depth=2).eval()
    images, mask = _images(), _mask()
    logits = model(images, mask)
    hidden = model.forward_features(images, mask)  # [B, L, C]
    rows = [hidden[b, p] for b in range(mask.shape[0]) for p in range(mask.shape[1]) if mask[b, p]]
    assert logits.shape == (int(mask.sum()), 8192)
    torch.testing.assert_close(logits, F.linear(torch.stack(rows), model.lm_head.weight, model.lm_head.bias))
    torch.testing.assert_close(model(images, mask.view(2, 8, 8)), logits)  # [B, h, w] masks are accepted


def test_masked_patches_only_see_the_mask_token():
    model = create_model(MIM, depth=2).eval()
    images, mask = _images(), _mask()
    patch_mask = mask.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2)  # [B, 32, 32] pixels
    noisy = images + 10 * torch.randn_like(images) * patch_mask.unsqueeze(1)  # change masked pixels only
    torch.testing.assert_close(model(noisy, mask), model(images, mask))


def test_mim_loss_matches_cross_entropy_and_zero_mask_gives_zero():
    model = create_model(MIM, depth=2)
    images, mask = _images(), _mask()
    labels = torch.randint(0, 8192, (2, 64))
    loss, accuracy = model(images, mask, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(images, mask), labels[mask]))
    assert 0.0 <= accuracy.item() <= 1.0

    empty = torch.zeros(2, 64, dtype=torch.bool)
    loss, accuracy = model(images, empty, labels)
    assert loss.item() == 0.0 and accuracy.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model(images, empty).shape == (0, 8192)


# ---------------------------------------------------------------- classification


def test_classification_shapes_and_pooling():
    model = create_model(CLS, img_size=28, num_classes=10, depth=2)
    assert model(_images(size=28)).shape == (2, 10)
    assert model.forward_features(_images(size=28)).shape == (2, 192)
    cls_pooled = create_model(CLS, use_mean_pooling=False, depth=1)
    assert cls_pooled.fc_norm is None and isinstance(cls_pooled.norm, torch.nn.LayerNorm)
    assert cls_pooled(_images(1)).shape == (1, 1000)
    assert isinstance(create_model(CLS, num_classes=0, depth=1).head, torch.nn.Identity)


def test_forward_intermediates():
    model = create_model(CLS, img_size=28, depth=4).eval()
    images = _images(size=28)
    features = model.forward_intermediates(images, [1, -1])
    assert [f.shape for f in features] == [(2, 192, 7, 7)] * 2
    last = model.forward_encoder(model.patch_embed(images))[:, 1:]  # [B, L, C] after the last block
    torch.testing.assert_close(features[1], last.transpose(1, 2).reshape(2, 192, 7, 7))
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(images, [4])


# ---------------------------------------------------------------- attention backends


def _forward_backward(model: torch.nn.Module, images, mask=None, labels=None):
    model.zero_grad()
    if mask is None:
        out = model(images)
        out.square().sum().backward()
    else:
        out, _ = model(images, mask, labels)
        out.backward()
    return out.detach(), _grads(model)


def _assert_same(run_a, run_b, **tolerance):
    torch.testing.assert_close(run_a[0], run_b[0], **tolerance)
    assert run_a[1].keys() == run_b[1].keys()
    for name in run_a[1]:
        torch.testing.assert_close(run_a[1][name], run_b[1][name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", [MIM, CLS])
def test_eager_and_sdpa_agree_in_fp32(name):
    # shared and per-layer tables at once (summed), both non-zero, so every bias path is exercised
    model = create_model(name, depth=2, attn_impl="eager", use_rel_pos_bias=True, use_shared_rel_pos_bias=True)
    _randomise_tables(model)
    images, mask, labels = _images(), _mask(), torch.randint(0, 8192, (2, 64))
    if name == CLS:
        mask = labels = None
    eager = _forward_backward(model, images, mask, labels)
    sdpa = _forward_backward(_twin(model, attn_impl="sdpa"), images, mask, labels)
    assert "rel_pos_bias.relative_position_bias_table" in eager[1]
    assert eager[1]["blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    _assert_same(eager, sdpa, rtol=1e-5, atol=1e-5)


def test_triton_path_passes_summed_tables_to_the_kernel(monkeypatch):
    # the kernel's PyTorch reference stands in for it (interpreter off, fixture): checks the model's wiring only
    monkeypatch.setattr(beit_kernels, "rel_pos_attention", lambda q, k, v, table, index, scale, plan:
                        beit_kernels.rel_pos_attention_ref(q, k, v, table, index, scale))
    monkeypatch.setattr(engine.model, "require_triton_available", lambda choice, alternative: None)
    model = create_model(MIM, depth=2, attn_impl="sdpa", use_rel_pos_bias=True)
    _randomise_tables(model)
    images, mask, labels = _images(), _mask(), torch.randint(0, 8192, (2, 64))
    sdpa = _forward_backward(model, images, mask, labels)
    triton = _forward_backward(_twin(model, attn_impl="triton"), images, mask, labels)
    _assert_same(sdpa, triton, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice", [dict(attn_impl="triton"), dict(mlm_loss="fused")])
def test_triton_backend_where_triton_cannot_run_is_an_error_at_build(choice):
    # fixture: TRITON_INTERPRET=0, and this machine has no GPU
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: Triton can run")
    with pytest.raises(ValueError, match="runs Triton kernels, which need a CUDA GPU.*choose .*(sdpa|reference)"):
        create_model(MIM, depth=1, **choice)


def test_triton_without_the_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(beit_kernels, "rel_pos_attention", raising=False)
    with pytest.raises(ValueError, match="needs beit_kernels.rel_pos_attention.*'sdpa' or 'eager'"):
        create_model(CLS, depth=1, attn_impl="triton")


# ---------------------------------------------------------------- gradient checkpointing


def test_grad_checkpointing_gives_identical_grads():
    # drop path on: the recompute must replay the RNG
    model = create_model(MIM, depth=3, drop_path_rate=0.2, vocab_size=512).train()
    _randomise_tables(model)
    images, mask, labels = _images(), _mask(), torch.randint(0, 512, (2, 64))
    torch.manual_seed(1)
    plain = _forward_backward(model, images, mask, labels)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    recomputed = _forward_backward(model, images, mask, labels)
    _assert_same(plain, recomputed, rtol=0, atol=0)
    assert create_model(MIM, depth=1, grad_checkpointing=True).grad_checkpointing


def test_mlm_loss_is_chosen_explicitly_and_gives_the_same_loss(monkeypatch):
    """The loss implementation is its own choice (not inferred from attn_impl); both agree."""
    torch.manual_seed(0)
    images, mask = _images(), _mask()
    labels = torch.randint(0, 8192, mask.shape)
    losses = []
    for mlm_loss in ("reference", "fused"):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if mlm_loss == "fused" else "0")  # the fused kernel, interpreted
        torch.manual_seed(1)
        model = create_model(MIM, depth=1, attn_impl="eager", mlm_loss=mlm_loss, max_masked_per_image=64).eval()
        assert model.lm_head.loss_impl == mlm_loss and model.config["mlm_loss"] == mlm_loss
        losses.append(model(images, mask, labels))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown mlm_loss"):
        create_model(MIM, depth=1, mlm_loss="liger")


def test_shared_relative_position_bias_is_gathered_once_per_forward(monkeypatch):
    import beit_kernels

    calls = []
    original = beit_kernels.rel_pos_bias
    monkeypatch.setattr(beit_kernels, "rel_pos_bias", lambda *args: calls.append(1) or original(*args))
    model = create_model(MIM, depth=3, attn_impl="sdpa")
    model(_images(), _mask())
    assert len(calls) == 1  # not once per block

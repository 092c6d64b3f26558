"""Checkpoint reading (official .pth, Hugging Face, own format), conversions, resizing and atomic saving."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engine.checkpoint as ckpt
import engine.checkpoint.__main__ as checkpoint_cli
import engine.checkpoint.write as checkpoint_write
from engine.factory import create_model
from engine.pos_embed import relative_position_index
from engine.resize import geometric_offsets, resize_abs_pos_embed, resize_rel_pos_bias_table

MIM = "beit_tiny_patch4_32_8k_vocab"
CLS = "beit_tiny_patch4_32"
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, attn_impl="eager")  # 4x4 token grid


def make(name: str, **overrides) -> torch.nn.Module:
    """Tiny model with every parameter random (tables and layer scales included, so nothing loads by accident)."""
    extra = dict(vocab_size=16) if name == MIM else dict(num_classes=10)
    model = create_model(name, **{**TINY, **extra, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def mask(batch: int = 2, num_patches: int = 16) -> torch.Tensor:
    return torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(2)) < 0.4


@torch.no_grad()
def outputs(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    if hasattr(model, "lm_head"):
        return model(images(size), mask(num_patches=(size // 8) ** 2))
    return model(images(size))


_EXECUTED: list[str] = []  # what unpickling a `Payload` did


def _record(tag: str) -> None:
    _EXECUTED.append(tag)


class Payload:
    """A pickled object whose unpickling runs code (here: a harmless `_record`)."""

    def __reduce__(self):
        return (_record, ("ran",))


def with_index_buffers(state: dict, model: torch.nn.Module) -> dict:
    """Add the persistent `relative_position_index` buffers that official checkpoints carry."""
    state = dict(state)
    index = relative_position_index(model.patch_embed.patch_shape)
    for key in [key for key in state if key.endswith("relative_position_bias_table")]:
        state[key.replace("relative_position_bias_table", "relative_position_index")] = index
    return state


# official → Hugging Face names, written out independently of engine.checkpoint's HF → official table
_HF_BLOCK = {
    "attn.q_bias": "attention.attention.query.bias",
    "attn.v_bias": "attention.attention.value.bias",
    "attn.relative_position_bias_table": "attention.attention.relative_position_bias.relative_position_bias_table",
    "attn.relative_position_index": "attention.attention.relative_position_bias.relative_position_index",
    "attn.proj.": "attention.output.dense.",
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
}
_HF_TOP = {
    "cls_token": "beit.embeddings.cls_token",
    "mask_token": "beit.embeddings.mask_token",
    "pos_embed": "beit.embeddings.position_embeddings",
    "patch_embed.proj.": "beit.embeddings.patch_embeddings.projection.",
    "rel_pos_bias.relative_position_bias_table": "beit.encoder.relative_position_bias.relative_position_bias_table",
    "rel_pos_bias.relative_position_index": "beit.encoder.relative_position_bias.relative_position_index",
    "fc_norm.": "beit.pooler.layernorm.",
    "head.": "classifier.",
    "lm_head.": "lm_head.",
}


def to_hf(state: dict, masked_image_modeling: bool) -> dict:
    hf = {}
    for key, value in state.items():
        block = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if block:
            layer, rest = block.groups()
            prefix = f"beit.encoder.layer.{layer}."
            if rest == "attn.qkv.weight":
                for part, weight in zip(("query", "key", "value"), value.chunk(3)):
                    hf[f"{prefix}attention.attention.{part}.weight"] = weight.clone()
                continue
            table = _HF_BLOCK
        else:
            prefix, rest = "", key
            norm = "layernorm." if masked_image_modeling else "beit.layernorm."
            table = {**_HF_TOP, "norm.": norm}
        old = next(old for old in table if rest.startswith(old))
        hf[prefix + table[old] + rest[len(old):]] = value.clone()
    return hf


# --------------------------------------------------------------------------------------------------- own format


@pytest.mark.parametrize("name", [MIM, CLS])
def test_own_format_round_trip(tmp_path, name):
    model = make(name)
    out = ckpt.save_pretrained(model, tmp_path / "run" / "final")
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "beit-engine" and config["version"] == 1 and config["model"]["name"] == name
    rebuilt = ckpt.create_model_from_checkpoint(out)
    assert type(rebuilt) is type(model)
    assert torch.equal(outputs(rebuilt), outputs(model))
    report = ckpt.load_checkpoint(make(name), out / "model.safetensors", strict=True)
    assert report.layout == "beit-engine" and not (report.missing or report.unexpected or report.dropped)


def test_save_overwrites_existing_checkpoint(tmp_path):
    first, second = make(CLS), make(CLS)
    ckpt.save_pretrained(first, tmp_path / "ckpt")
    ckpt.save_pretrained(second, tmp_path / "ckpt")
    assert torch.equal(outputs(ckpt.create_model_from_checkpoint(tmp_path / "ckpt")), outputs(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    good = make(CLS)
    ckpt.save_pretrained(good, tmp_path / "ckpt")

    def failing_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_write, "save_file", failing_writer)
    for target in ("ckpt", "fresh"):
        with pytest.raises(OSError, match="disk full"):
            ckpt.save_pretrained(make(CLS), tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial dir, no temp dir left behind
    monkeypatch.undo()
    assert torch.equal(outputs(ckpt.create_model_from_checkpoint(tmp_path / "ckpt")), outputs(good))


def test_non_square_source_grid_comes_from_the_config(tmp_path):
    # (3, 5) and (5, 3) token grids have tables of the same shape; only the saved config tells them apart
    source = make(CLS, img_size=(24, 40))
    ckpt.save_pretrained(source, tmp_path / "wide")
    target = make(CLS, img_size=(40, 24))
    report = ckpt.load_checkpoint(target, tmp_path / "wide", strict=True)
    assert sum("resized from window (3, 5) to (5, 3)" in line for line in report.converted) == 2
    expected = resize_rel_pos_bias_table(source.blocks[0].attn.relative_position_bias_table, (3, 5), (5, 3))
    assert torch.equal(target.blocks[0].attn.relative_position_bias_table, expected)


def test_a_model_trained_with_the_triton_kernels_loads_on_a_cpu(tmp_path, monkeypatch):
    """A checkpoint whose config names attn_impl='triton' and mlm_loss='fused' rebuilds with sdpa / reference where
    Triton cannot run, strictly, with the same weights."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = make(MIM)
    model.config.update(attn_impl="triton", mlm_loss="fused")  # as a GPU run saves it
    ckpt.save_pretrained(model, tmp_path / "ckpt")
    rebuilt = ckpt.create_model_from_checkpoint(tmp_path / "ckpt")
    assert (rebuilt.attn_impl, rebuilt.lm_head.loss_impl) == ("sdpa", "reference")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_create_model_from_checkpoint_with_overrides(tmp_path):
    ckpt.save_pretrained(make(CLS), tmp_path / "ckpt")
    model = ckpt.create_model_from_checkpoint(tmp_path / "ckpt", num_classes=3)
    assert model.head.out_features == 3


# ------------------------------------------------------------------------------------------------- official .pth


@pytest.mark.parametrize("wrapper", ["model", "module", None])
@pytest.mark.parametrize("name", [MIM, CLS])
def test_official_pth(tmp_path, name, wrapper):
    source = make(name)
    state = with_index_buffers(source.state_dict(), source)
    # official training checkpoints also hold optimizer state, the epoch and the argparse namespace
    payload = state if wrapper is None else {wrapper: state, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}
    torch.save(payload, tmp_path / "checkpoint-3.pth")
    target = make(name)
    report = ckpt.load_checkpoint(target, tmp_path / "checkpoint-3.pth", strict=True)
    assert report.layout == "official"
    assert all(line.split(":")[0].endswith("relative_position_index") for line in report.dropped)
    assert torch.equal(outputs(target), outputs(source))


def test_pickled_objects_refused_and_trust_pickle_opt_in(tmp_path):
    source = make(CLS)
    torch.save({"model": source.state_dict(), "extra": Payload()}, tmp_path / "old.pth")
    _EXECUTED.clear()
    with pytest.raises(ValueError, match=r"pickled Python objects.*--trust-pickle"):
        ckpt.load_checkpoint(make(CLS), tmp_path / "old.pth")
    with pytest.raises(ValueError, match="pickled Python objects"):
        ckpt.export_safetensors(tmp_path / "old.pth", tmp_path / "out", dict(name=CLS, **TINY, num_classes=10))
    assert _EXECUTED == [] and not (tmp_path / "out").exists()
    ckpt.export_safetensors(tmp_path / "old.pth", tmp_path / "out", dict(name=CLS, **TINY, num_classes=10),
                            trust_pickle=True)
    assert _EXECUTED == ["ran"]  # the explicit opt-in really unpickles
    assert torch.equal(outputs(ckpt.create_model_from_checkpoint(tmp_path / "out")), outputs(source))


# --------------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("name", [MIM, CLS])
def test_hugging_face_layout(tmp_path, name, weights_name):
    source = make(name)
    hf_state = to_hf(with_index_buffers(source.state_dict(), source), masked_image_modeling=name == MIM)
    assert "beit.encoder.layer.1.attention.attention.key.weight" in hf_state
    if weights_name.endswith(".bin"):
        torch.save(hf_state, tmp_path / weights_name)
    else:
        save_file(hf_state, tmp_path / weights_name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "beit", "image_size": 32, "patch_size": 8}))
    for path in (tmp_path, tmp_path / weights_name):
        target = make(name)
        report = ckpt.load_checkpoint(target, path, strict=True)
        assert report.layout == "huggingface"
        assert torch.equal(outputs(target), outputs(source))


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.safetensors"])
def test_sharded_hugging_face_checkpoint_loads_like_a_single_file(tmp_path, weights_name):
    source = make(CLS)
    hf_state = to_hf(source.state_dict(), masked_image_modeling=False)
    names = sorted(hf_state)
    shards = {f"{weights_name.split('.')[0]}-0000{i + 1}-of-00002.{weights_name.split('.')[-1]}": names[i::2]
              for i in range(2)}  # two shards, interleaved names
    for shard, shard_names in shards.items():
        part = {k: hf_state[k].contiguous() for k in shard_names}
        torch.save(part, tmp_path / shard) if shard.endswith(".bin") else save_file(part, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    (tmp_path / f"{weights_name}.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "beit", "image_size": 32, "patch_size": 8}))
    for path in (tmp_path, tmp_path / f"{weights_name}.index.json"):
        target = make(CLS)
        assert ckpt.load_checkpoint(target, path, strict=True).layout == "huggingface"
        assert torch.equal(outputs(target), outputs(source))
    (tmp_path / next(iter(shards))).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt.load_checkpoint(make(CLS), tmp_path)


def test_hugging_face_cli_conversion(tmp_path):
    source = make(CLS)
    save_file(to_hf(source.state_dict(), masked_image_modeling=False), tmp_path / "model.safetensors")
    overrides = [f"--set={key}={json.dumps(value)}" for key, value in {**TINY, "num_classes": 10}.items()]
    checkpoint_cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "ours"), "--model", CLS,
                         *overrides])
    assert torch.equal(outputs(ckpt.create_model_from_checkpoint(tmp_path / "ours")), outputs(source))


def _hf_config(transformers, masked_image_modeling: bool):
    return transformers.BeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=10, vocab_size=16, layer_norm_eps=1e-6, use_mean_pooling=True,
        use_relative_position_bias=not masked_image_modeling, use_shared_relative_position_bias=masked_image_modeling,
        use_mask_token=masked_image_modeling, hidden_act="gelu")


@pytest.mark.parametrize("name", [MIM, CLS])
def test_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    masked = name == MIM
    hf_cls = transformers.BeitForMaskedImageModeling if masked else transformers.BeitForImageClassification
    hf_model = hf_cls(_hf_config(transformers, masked)).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_(0.0, 0.2)
    hf_model.save_pretrained(tmp_path)
    ours = make(name)
    ckpt.load_checkpoint(ours, tmp_path, strict=True)
    with torch.no_grad():
        if masked:
            hf_logits = hf_model(pixel_values=images(), bool_masked_pos=mask()).logits[mask()]
        else:
            hf_logits = hf_model(pixel_values=images()).logits
    torch.testing.assert_close(outputs(ours), hf_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- conversions


def test_shared_table_expanded_to_per_layer(tmp_path):
    pretrained = make(MIM)
    torch.save({"model": pretrained.state_dict()}, tmp_path / "pt.pth")
    finetune = make(CLS, use_mean_pooling=False)  # keeps `norm`, so features are comparable end to end
    report = ckpt.load_checkpoint(finetune, tmp_path / "pt.pth")
    shared = pretrained.rel_pos_bias.relative_position_bias_table
    for block in finetune.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    assert any("shared table expanded" in line for line in report.converted)
    assert report.missing == ["head.bias", "head.weight"]
    assert set(report.unexpected) == {"lm_head.bias", "lm_head.weight", "mask_token"}
    with torch.no_grad():
        expected = pretrained.forward_encoder(pretrained.patch_embed(images()))  # [B, N, C]
        torch.testing.assert_close(finetune.forward_encoder(finetune.patch_embed(images())), expected)
        last = finetune.forward_intermediates(images(), [-1])[0]  # [B, C, h, w]
        torch.testing.assert_close(last.flatten(2).transpose(1, 2), expected[:, 1:])
        no_mask = torch.zeros(2, 16, dtype=torch.bool)
        torch.testing.assert_close(finetune.norm(expected)[:, 1:], pretrained.forward_features(images(), no_mask))


def test_per_layer_into_shared_is_an_error(tmp_path):
    torch.save({"model": make(CLS).state_dict()}, tmp_path / "ft.pth")
    with pytest.raises(ValueError, match="per-layer tables cannot be merged"):
        ckpt.load_checkpoint(make(MIM), tmp_path / "ft.pth")


def test_head_shape_mismatch_dropped_and_reported(tmp_path):
    source = make(CLS)
    torch.save({"model": source.state_dict()}, tmp_path / "ft.pth")
    target = make(CLS, num_classes=5)
    report = ckpt.load_checkpoint(target, tmp_path / "ft.pth")
    assert [line.split(":")[0] for line in report.dropped] == ["head.weight", "head.bias"]
    assert report.missing == ["head.bias", "head.weight"]
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="strict load failed"):
        ckpt.load_checkpoint(make(CLS, num_classes=5), tmp_path / "ft.pth", strict=True)


def test_other_shape_mismatch_is_an_error(tmp_path):
    torch.save({"model": make(CLS).state_dict()}, tmp_path / "ft.pth")
    with pytest.raises(ValueError, match="does not fit the model"):
        ckpt.load_checkpoint(make(CLS, embed_dim=64), tmp_path / "ft.pth")


def test_cast_to_model_dtype(tmp_path):
    source = make(CLS)
    torch.save({"model": source.state_dict()}, tmp_path / "ft.pth")
    target = make(CLS).to(torch.bfloat16)
    ckpt.load_checkpoint(target, tmp_path / "ft.pth", strict=True)
    assert target.head.weight.dtype == torch.bfloat16
    assert torch.equal(target.head.weight, source.head.weight.to(torch.bfloat16))


def test_bad_paths_name_supported_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="supported layouts"):
        ckpt.load_checkpoint(make(CLS), tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="supported layouts"):
        ckpt.load_checkpoint(make(CLS), tmp_path / "empty")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="supported layouts"):
        ckpt.load_checkpoint(make(CLS), tmp_path / "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="no state dict"):
        ckpt.load_checkpoint(make(CLS), tmp_path / "no_weights.pth")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        ckpt.create_model_from_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------ resizing


def _official_source_coords(src_len: int, dst_len: int) -> np.ndarray:
    """The official unilm loop (bisection + geometric distances), re-typed here as an independent oracle."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src_len // 2)) / (1.0 - q) > dst_len // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_len // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def _cubic(dy: np.ndarray, dx: np.ndarray, heads: int) -> np.ndarray:
    """`[len, heads]` values of a polynomial of degree <= 3 in each axis (one per head) on the grid dy x dx."""
    dy, dx = np.meshgrid(dy, dx, indexing="ij")
    return np.stack([(0.3 + 0.1 * dy - 0.02 * dx**2 + 0.001 * (head + 1) * dy**3 + 0.003 * dy * dx**2).reshape(-1)
                     for head in range(heads)], axis=1)


@pytest.mark.parametrize("src, dst", [((4, 4), (6, 6)), ((14, 14), (24, 24)), ((3, 5), (6, 4)), ((4, 4), (4, 7))])
def test_rel_pos_table_resize(src, dst):
    heads = 3
    src_len, dst_len = [2 * s - 1 for s in src], [2 * d - 1 for d in dst]
    coords = tuple(geometric_offsets(s, d).numpy() if s != d else np.arange(-(s // 2), s // 2 + 1.0)
                   for s, d in zip(src_len, dst_len))
    # values sampled from per-axis cubics at the geometric source positions: the spline reproduces them exactly
    cls_rows = np.arange(3.0 * heads).reshape(3, heads) + 10.0
    table = torch.from_numpy(np.concatenate([_cubic(*coords, heads), cls_rows]))
    resized = resize_rel_pos_bias_table(table, src, dst)
    assert resized.shape == ((2 * dst[0] - 1) * (2 * dst[1] - 1) + 3, heads) and resized.dtype == table.dtype
    assert torch.equal(resized[-3:], table[-3:])  # CLS rows kept
    targets = [np.clip(np.arange(-(n // 2), n // 2 + 1.0), c[0], c[-1]) for n, c in zip(dst_len, coords)]
    expected = _cubic(*targets, heads)
    np.testing.assert_allclose(resized[:-3].numpy(), expected, atol=1e-9)


def test_rel_pos_table_resize_identity_and_centre():
    table = torch.randn(7 * 7 + 3, 2)
    assert resize_rel_pos_bias_table(table, (4, 4), (4, 4)) is table
    resized = resize_rel_pos_bias_table(table, (4, 4), (6, 6))
    src_grid, dst_grid = table[:-3].view(7, 7, 2), resized[:-3].view(11, 11, 2)
    # offsets 0 and ±1 are source sample points in the official layout, so they keep their values
    torch.testing.assert_close(dst_grid[4:7, 4:7], src_grid[2:5, 2:5], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not fit window"):
        resize_rel_pos_bias_table(table, (5, 5), (6, 6))


@pytest.mark.parametrize("src, dst", [((14, 14), (24, 24)), ((4, 4), (6, 6)), ((3, 5), (6, 4))])
def test_rel_pos_table_resize_matches_scipy(src, dst):
    interpolate = pytest.importorskip("scipy.interpolate")
    table = torch.randn((2 * src[0] - 1) * (2 * src[1] - 1) + 3, 2, dtype=torch.float64)
    resized = resize_rel_pos_bias_table(table, src, dst)
    src_len, dst_len = [2 * s - 1 for s in src], [2 * d - 1 for d in dst]
    coords = [_official_source_coords(s, d) for s, d in zip(src_len, dst_len)]
    targets = [np.clip(np.arange(-(n // 2), n // 2 + 1.0), c[0], c[-1]) for n, c in zip(dst_len, coords)]
    for head in range(2):  # interp2d(kind='cubic') on a grid == FITPACK bicubic interpolating spline
        spline = interpolate.RectBivariateSpline(*coords, table[:-3, head].view(*src_len).numpy(), kx=3, ky=3, s=0)
        np.testing.assert_allclose(resized[:-3, head].numpy(), spline(*targets).reshape(-1), atol=1e-9)


def test_model_resize_on_load(tmp_path):
    source = make(CLS)  # 4x4 tokens
    torch.save({"model": source.state_dict()}, tmp_path / "ft224.pth")
    target = make(CLS, img_size=48)  # 6x6 tokens, like 224 → 384
    report = ckpt.load_checkpoint(target, tmp_path / "ft224.pth", strict=True)
    table = target.blocks[0].attn.relative_position_bias_table
    assert table.shape == (11 * 11 + 3, 2)
    assert torch.equal(table[-3:], source.blocks[0].attn.relative_position_bias_table[-3:])
    assert sum("resized from window (4, 4) to (6, 6)" in line for line in report.converted) == 2
    assert outputs(target, size=48).shape == (2, 10)


def test_abs_pos_embed_resize(tmp_path):
    pos_embed = torch.randn(1, 1 + 4 * 4, 8)
    assert resize_abs_pos_embed(pos_embed, (4, 4), (4, 4)) is pos_embed
    resized = resize_abs_pos_embed(pos_embed, (4, 4), (2, 3))
    assert resized.shape == (1, 1 + 2 * 3, 8) and torch.equal(resized[:, 0], pos_embed[:, 0])
    constant = torch.ones(1, 1 + 3 * 5, 4)
    torch.testing.assert_close(resize_abs_pos_embed(constant, (3, 5), (6, 4)), torch.ones(1, 1 + 24, 4))

    source = make(CLS, use_abs_pos_emb=True)
    torch.save({"model": source.state_dict()}, tmp_path / "abs.pth")
    target = make(CLS, use_abs_pos_emb=True, img_size=48)
    report = ckpt.load_checkpoint(target, tmp_path / "abs.pth", strict=True)
    assert any(line.startswith("pos_embed: resized") for line in report.converted)
    torch.testing.assert_close(target.pos_embed, resize_abs_pos_embed(source.pos_embed, (4, 4), (6, 6)))


def test_every_backbone_tensor_leaves_its_init_when_fine_tuning_loads_pretraining(tmp_path):
    """The path fine-tuning takes (save_pretrained export → load_checkpoint into a classifier): every backbone tensor
    must come from the checkpoint; only the new head and fc_norm keep their init, and the report says so."""
    pretrained = make(MIM)
    ckpt.save_pretrained(pretrained, tmp_path / "pretrained")
    finetune = create_model(CLS, **{**TINY, "num_classes": 10})  # the fine-tuning init (mean pooling, fc_norm)
    init = {k: v.clone() for k, v in finetune.state_dict().items()}
    report = ckpt.load_checkpoint(finetune, tmp_path / "pretrained")
    source = pretrained.state_dict()
    shared = source["rel_pos_bias.relative_position_bias_table"]
    fresh = ("head.", "fc_norm.")
    for key, value in finetune.state_dict().items():
        if key.startswith(fresh) or key.endswith("relative_position_index"):
            continue
        expected = shared if key.endswith("attn.relative_position_bias_table") else source[key]
        assert not torch.equal(value, init[key]), f"{key} kept its init value"
        assert torch.equal(value, expected), key
    assert set(report.missing) == {k for k in init if k.startswith(fresh)}
    assert set(report.unexpected) == {"lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"}
    assert set(report.loaded) == {k for k in init if not k.startswith(fresh) and not k.endswith("_index")}

"""Segmentation model side: BEiT backbone + neck, UPerHead / FCNHead, loss, layer-decay groups, inference, metrics."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import engine
from engine.checkpoint import load_checkpoint, save_pretrained
from engine.factory import create_model
from engine.segmentation.backbone import BeitBackbone, create_backbone, default_out_indices, layer_id_for_segmentation
from engine.segmentation.batchnorm import BatchNorm2d, SyncBatchNorm, convert_sync_batchnorm
from engine.segmentation.heads import FCNHead, UPerHead
from engine.segmentation.metrics import confusion_matrix, reduce_confusion, segmentation_metrics
from engine.segmentation.model import (
    STAT_NAMES,
    SegmentationLoss,
    aug_inference,
    create_segmenter,
    segmentation_loss,
    segmentation_param_groups,
    slide_inference,
    whole_inference,
)

MINI = "beit_mini_patch4_28"
# 8x8 token grid of 4 px patches: pyramid strides 1, 2, 4, 8 (maps 32, 16, 8, 4 px)
TINY = dict(img_size=32, depth=2, embed_dim=32, num_heads=2, attn_impl="eager")


def tiny_segmenter(num_classes: int = 5, **overrides) -> torch.nn.Module:
    return create_segmenter(MINI, num_classes, channels=16, aux_channels=8, **{**TINY, **overrides})


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


class PixelModel(torch.nn.Module):
    """A 1×1 convolution: logits of each pixel depend on that pixel only, wherever the window lies."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ------------------------------------------------------------------------------------- shapes of the real sizes


@pytest.mark.slow
@pytest.mark.parametrize("name, width, size", [("beit_base_patch16_224", 768, 512), ("beit_base_patch16_224", 768, 640),
                                               ("beit_large_patch16_224", 1024, 512),
                                               ("beit_large_patch16_224", 1024, 640)])
def test_backbone_and_heads_shapes_on_meta(monkeypatch, name, width, size):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch path of the kernels is the one that runs on meta
    with torch.device("meta"):
        model = create_segmenter(name, num_classes=150, img_size=size)
        x = torch.empty(2, 3, size, size)
        features = model.backbone(x)
        maps = list(features.values())
        decoded, aux = model.decode_head(maps), model.auxiliary_head(maps)
        logits, aux_logits = model.forward_train(x)
    backbone = model.backbone
    assert backbone.strides == [4, 8, 16, 32] and backbone.out_channels == [width] * 4
    assert backbone.feature_names == list(features) == ["p2", "p3", "p4", "p5"]
    assert backbone.out_indices == ([3, 5, 7, 11] if width == 768 else [7, 11, 15, 23])
    for feature, stride in zip(maps, backbone.strides):
        assert feature.shape == (2, width, size // stride, size // stride)
    assert model.decode_head.channels == width and model.decode_head.in_channels == [width] * 4
    assert decoded.shape == (2, 150, size // 4, size // 4)
    assert aux.shape == (2, 150, size // 16, size // 16) and model.auxiliary_head.channels == 256
    assert logits.shape == aux_logits.shape == (2, 150, size, size)


# --------------------------------------------------------------------------------------------- backbone rules


def test_default_out_indices_official_and_the_rule_for_other_depths():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]
    # other depths: ceil(depth * k / 4) - 1, k = 1..4 (evenly spaced, ending at the last block)
    assert default_out_indices(2) == [0, 0, 1, 1]
    assert default_out_indices(6) == [1, 2, 4, 5]
    assert default_out_indices(8) == [1, 3, 5, 7]
    assert default_out_indices(1) == [0, 0, 0, 0]
    for depth in range(1, 40):
        if depth in (12, 24):
            continue
        indices = default_out_indices(depth)
        assert indices == [math.ceil(depth * k / 4) - 1 for k in range(1, 5)]
        assert indices == sorted(indices) and indices[0] >= 0 and indices[-1] == depth - 1


def test_backbone_drops_unused_head_and_trailing_blocks():
    backbone = create_backbone(MINI, **TINY)
    names = [name for name, _ in backbone.named_parameters()]
    assert not any(name.startswith(("encoder.head", "encoder.fc_norm", "encoder.norm.")) for name in names)
    assert backbone.encoder.fc_norm is None and backbone.out_indices == [0, 0, 1, 1]
    assert backbone.no_weight_decay() == {"encoder.cls_token", "encoder.pos_embed"}
    cls_pooled = create_backbone(MINI, **TINY, use_mean_pooling=False)
    assert isinstance(cls_pooled.encoder.norm, torch.nn.Identity)
    truncated = create_backbone(MINI, out_indices=[0, 1, 1, 2], **{**TINY, "depth": 4})  # block 3 would be unused
    assert truncated.get_num_layers() == 3 and truncated.encoder.config["depth"] == 3
    assert create_backbone(MINI, out_indices=[-4, -3, -2, -1], **{**TINY, "depth": 4}).out_indices == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out_indices"):
        create_backbone(MINI, out_indices=[0, 1, 2], **TINY)
    with pytest.raises(ValueError, match="out_indices"):
        create_backbone(MINI, out_indices=[1, 0, 1, 1], **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone(MINI, num_classes=3, **TINY)
    # input_size is img_size; a pretraining name builds its classification twin
    same = create_backbone("beit_mini_patch4_28_256_vocab", input_size=32, depth=2, embed_dim=32, num_heads=2)
    assert same.img_size == (32, 32) and type(same.encoder).__name__ == "BeitForImageClassification"
    assert engine.create_backbone is create_backbone


def test_tiny_model_forward_backward_reaches_every_parameter():
    model = tiny_segmenter().train()
    x = images()
    labels = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(3))
    labels[0, :4] = 255
    features = model.backbone(x)
    assert [tuple(f.shape) for f in features.values()] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8),
                                                           (2, 32, 4, 4)]
    assert model.backbone.strides == [1, 2, 4, 8]
    loss, stats = SegmentationLoss(model)(x, labels)
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert stats.shape == (len(STAT_NAMES),) and stats[-1].item() == 2 * 32 * 32 - 4 * 32
    assert model(x).shape == (2, 5, 32, 32)
    with pytest.raises(ValueError, match="img_size"):
        model(images(height=48))


def test_mim_checkpoint_at_another_size_loads_into_the_backbone(tmp_path):
    dims = dict(embed_dim=32, depth=2, num_heads=2, attn_impl="eager")
    pretrained = create_model("beit_tiny_patch4_32_8k_vocab", img_size=32, vocab_size=16, **dims)  # 8x8 grid
    with torch.no_grad():
        for param in pretrained.parameters():
            param.normal_(0.0, 0.2)
    save_pretrained(pretrained, tmp_path / "mim")
    backbone = create_backbone("beit_tiny_patch4_32", img_size=48, **dims)  # 12x12 grid
    report = load_checkpoint(backbone.encoder, tmp_path / "mim")
    assert report.missing == []
    assert set(report.unexpected) == {"lm_head.weight", "lm_head.bias", "mask_token", "norm.weight", "norm.bias"}
    assert any("shared table expanded" in line for line in report.converted)
    assert any("resized from window (8, 8) to (12, 12)" in line for line in report.converted)
    table = backbone.encoder.blocks[1].attn.relative_position_bias_table
    assert table.shape == ((2 * 12 - 1) ** 2 + 3, 2)
    torch.testing.assert_close(table, backbone.encoder.blocks[0].attn.relative_position_bias_table)
    assert torch.equal(backbone.encoder.blocks[1].mlp.fc2.weight, pretrained.blocks[1].mlp.fc2.weight)
    assert torch.equal(backbone.encoder.cls_token, pretrained.cls_token)
    assert [f.shape[-1] for f in backbone.eval()(images(height=48, width=48)).values()] == [48, 24, 12, 6]


# ----------------------------------------------------------------------------------------- layer decay groups


def test_layer_ids_and_param_groups_follow_the_official_segmentation_constructor():
    model = tiny_segmenter()
    num_layers = model.get_num_layers()
    assert num_layers == 2
    expected = {"backbone.encoder.patch_embed.proj.weight": 0, "backbone.encoder.cls_token": 0,
                "backbone.encoder.blocks.0.attn.qkv.weight": 1, "backbone.encoder.blocks.1.gamma_2": 2,
                "backbone.fpn1.0.weight": 3, "backbone.fpn2.0.bias": 3, "decode_head.conv_seg.weight": 3,
                "auxiliary_head.convs.0.conv.weight": 3, "module.backbone.encoder.blocks.1.norm1.bias": 2,
                "module.model.backbone.encoder.blocks.0.gamma_1": 1, "model.decode_head.conv_seg.bias": 3,
                "encoder.blocks.0.mlp.fc1.weight": 1, "encoder.pos_embed": 0, "encoder.rel_pos_bias.x": 3}
    for name, layer in expected.items():
        assert layer_id_for_segmentation(name, num_layers) == layer, name
    official_names = {"backbone.fpn1.0.weight", "backbone.fpn1.1.weight", "backbone.fpn1.3.weight",
                      "backbone.fpn2.0.weight", "decode_head.psp_modules.3.1.conv.weight",
                      "decode_head.psp_modules.0.1.bn.weight", "decode_head.bottleneck.conv.weight",
                      "decode_head.lateral_convs.2.conv.weight", "decode_head.fpn_convs.0.bn.bias",
                      "decode_head.fpn_bottleneck.conv.weight", "decode_head.conv_seg.bias",
                      "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.weight"}
    assert official_names <= set(model.state_dict())  # mmseg / unilm names (the encoder's under backbone.encoder.)
    groups = segmentation_param_groups(model, weight_decay=0.05, layer_decay=0.9)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert sorted(by_name) == sorted(name for name, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert by_name["backbone.encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.9 ** 2)
    assert by_name["backbone.encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.9 ** 3)
    assert by_name["decode_head.fpn_bottleneck.conv.weight"]["lr_scale"] == 1.0
    assert by_name["decode_head.fpn_bottleneck.conv.weight"]["weight_decay"] == 0.05
    for no_decay in ("backbone.encoder.cls_token", "decode_head.fpn_bottleneck.bn.weight", "backbone.fpn1.1.bias",
                     "backbone.encoder.blocks.0.gamma_1", "decode_head.conv_seg.bias"):
        assert by_name[no_decay]["weight_decay"] == 0.0, no_decay
    flat = segmentation_param_groups(model, weight_decay=0.05)
    assert {g["lr_scale"] for g in flat} == {1.0}


# ------------------------------------------------------------------------------------------------------- loss


def test_segmentation_loss_ignores_pixels_and_weights_the_auxiliary_head():
    gen = torch.Generator().manual_seed(4)
    logits, aux = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    labels[1, 2:] = 255
    loss, stats = segmentation_loss(logits, aux, labels, aux_weight=0.4)
    decode = F.cross_entropy(logits, labels, ignore_index=255)  # mean over labelled pixels
    expected = decode + 0.4 * F.cross_entropy(aux, labels, ignore_index=255)
    torch.testing.assert_close(loss, expected)
    valid = 40 - 10
    torch.testing.assert_close(stats, torch.stack([expected * valid, decode * valid, (expected - decode) / 0.4 * valid,
                                                   torch.tensor(float(valid))]))
    every_pixel, stats_all = segmentation_loss(logits, None, labels, average="all")
    torch.testing.assert_close(every_pixel, F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / 40)
    assert stats_all[-1].item() == 40 and stats_all[2].item() == 0
    nothing, _ = segmentation_loss(logits, aux, torch.full_like(labels, 255))
    assert nothing.item() == 0.0
    small = segmentation_loss(logits, None, labels[:, ::2, ::2].contiguous())[0]  # logits resized to the labels
    assert torch.isfinite(small)


# -------------------------------------------------------------------------------------------------- inference


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = tiny_segmenter().eval()
    x = images()
    whole = whole_inference(model, x)
    torch.testing.assert_close(slide_inference(model, x, 5, crop_size=32, stride=21), whole)
    torch.testing.assert_close(slide_inference(model, x, None, crop_size=(32, 32), stride=(16, 16)), whole)
    with pytest.raises(ValueError, match=r"img_size=\(32, 32\)"):
        whole_inference(model, images(height=40, width=40))


def _reference_slide(model, x, crop, stride):
    """mmseg's slide_inference, written out (F.pad accumulation)."""
    batch, _, height, width = x.shape
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    preds, count = None, torch.zeros(batch, 1, height, width)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = model(x[:, :, y1:y2, x1:x2])
            padded = F.pad(out, (x1, width - x2, y1, height - y2))
            preds = padded if preds is None else preds + padded
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def test_slide_inference_with_several_windows():
    x = images(height=50, width=70)
    pixel = PixelModel().eval()
    with torch.no_grad():
        direct = pixel(x)
        torch.testing.assert_close(slide_inference(pixel, x, 4, crop_size=32, stride=20), direct)
        # the image smaller than the crop: zero padding, logits cropped back
        small = images(height=20, width=26)
        torch.testing.assert_close(slide_inference(pixel, small, 4, crop_size=32, stride=20), pixel(small))
        # a position-dependent model: the windows and their average are mmseg's
        model = tiny_segmenter().eval()
        torch.testing.assert_close(slide_inference(model, x, 5, crop_size=32, stride=20),
                                   _reference_slide(model, x, 32, 20))
    # windows (top-left corners) for 50x70, crop 32, stride 20: rows 0, 18; columns 0, 20, 38
    corners = []

    def recorder(window):
        corners.append((int(window[0, 0, 0, 0]), int(window[0, 1, 0, 0])))
        return torch.zeros(window.shape[0], 2, *window.shape[2:])

    grid = torch.stack(torch.meshgrid(torch.arange(50.0), torch.arange(70.0), indexing="ij"))[None]  # [1, 2, H, W]
    slide_inference(recorder, torch.cat([grid, grid[:, :1]], dim=1), 2, crop_size=32, stride=20)
    assert corners == [(0, 0), (0, 20), (0, 38), (18, 0), (18, 20), (18, 38)]
    with pytest.raises(ValueError, match="stride"):
        slide_inference(pixel, x, 4, crop_size=32, stride=40)


def test_aug_inference_averages_probabilities_over_scales_and_flips():
    pixel = PixelModel().eval()
    x = images(height=40, width=36)
    with torch.no_grad():
        probs = aug_inference(pixel, x, flip=True, crop_size=32, stride=20)
        torch.testing.assert_close(probs, pixel(x).softmax(dim=1))  # a 1x1 conv commutes with the flip
        sizes = ((20, 18), (40, 36), (60, 54))
        multi = aug_inference(pixel, x, sizes=sizes, flip=True, crop_size=32, stride=20, out_size=(30, 27))
        assert multi.shape == (2, 4, 30, 27)
        torch.testing.assert_close(multi.sum(dim=1), torch.ones(2, 30, 27))
        expected = sum(F.interpolate(pixel(F.interpolate(x, size=size, mode="bilinear", align_corners=False)),
                                     size=(30, 27), mode="bilinear", align_corners=False).softmax(dim=1)
                       for size in sizes) / 3
        torch.testing.assert_close(multi, expected, atol=1e-5, rtol=1e-5)
    model = tiny_segmenter().eval()
    whole = aug_inference(model, images(), mode="whole")
    torch.testing.assert_close(whole, whole_inference(model, images()).softmax(dim=1))
    with pytest.raises(ValueError, match="whole inference"):
        aug_inference(model, images(), sizes=[(42, 42)], mode="whole")


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_match_a_hand_computed_confusion_matrix():
    # K = 4. Pixels labelled 255 (ignore) or 4 (out of range) do not count. Counted (label, pred) pairs:
    # (0,0)x3 (0,1) (1,1)x3 (1,2) (1,0)  → conf rows (ground truth) [[3,1,0,0], [1,3,1,0], [0]*4, [0]*4]
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 255, 255, 1, 1, 4]])
    preds = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 0, 3, 0, 1, 0]])
    conf = confusion_matrix(preds, labels, num_classes=4)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[3, 1, 0, 0], [1, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # split into two batches and summed: the same matrix; no process group: reduce is the identity
    halves = confusion_matrix(preds[:, :6], labels[:, :6], 4) + confusion_matrix(preds[:, 6:], labels[:, 6:], 4)
    assert torch.equal(reduce_confusion(halves), conf)
    metrics = segmentation_metrics(conf, class_names=["a", "b", "c", "d"])
    # IoU = TP / (GT + Pred - TP): a 3/(4+4-3) = 0.6, b 3/(5+4-3) = 0.5, c 0/(0+1-0) = 0 (predicted, absent),
    # d 0/0 = NaN (absent from both: excluded from the mean)
    iou = metrics["per_class_iou"]
    assert iou[:3] == pytest.approx([60.0, 50.0, 0.0]) and math.isnan(iou[3])
    assert metrics["mIoU"] == pytest.approx((60.0 + 50.0 + 0.0) / 3)  # 36.67
    # Acc = TP / GT: a 3/4, b 3/5; c and d have no ground truth (NaN)
    acc = metrics["per_class_acc"]
    assert acc[:2] == pytest.approx([75.0, 60.0]) and math.isnan(acc[2]) and math.isnan(acc[3])
    assert metrics["mAcc"] == pytest.approx(67.5)
    assert metrics["aAcc"] == pytest.approx(100 * 6 / 9)  # 66.67
    assert metrics["class_names"] == ["a", "b", "c", "d"]


def test_batch_norm_computes_in_fp32_under_parameters_cast_as_deepspeed_casts_them():
    # DeepSpeed's bf16 casts the parameters and keeps the buffers: torch's BatchNorm2d then fails on a CPU
    # ("expected scalar type BFloat16 but found Float") and no precision the recipes allow may break a segmenter
    model, reference = tiny_segmenter().train(), tiny_segmenter().train()
    reference.load_state_dict(model.state_dict())
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)  # deepspeed/runtime/engine.py's cast, buffers untouched
    labels = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(3))
    loss, _ = SegmentationLoss(model)(images().bfloat16(), labels)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert {b.dtype for name, b in model.named_buffers() if "running" in name} == {torch.float32}
    SegmentationLoss(reference)(images(), labels)
    torch.testing.assert_close(model.backbone.fpn1[1].running_var, reference.backbone.fpn1[1].running_var,
                               rtol=0.05, atol=1e-3)  # bf16 activations, fp32 statistics
    # fp32 throughout: exactly torch's BatchNorm2d; bf16 statistics (older DeepSpeed cast buffers too) stay bf16
    norm, plain = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var, plain.running_var, rtol=0, atol=0)
    norm.bfloat16()
    assert norm(x.bfloat16()).dtype == torch.bfloat16 and norm.running_mean.dtype == torch.bfloat16
    torch.testing.assert_close(norm.running_mean.float(), plain.running_mean * 0.9 + x.mean((0, 2, 3)) * 0.1,
                               rtol=0.02, atol=1e-2)


def test_confusion_matrix_on_images_and_sync_bn_option():
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (2, 6, 7), generator=gen)
    preds = torch.randint(0, 3, (2, 6, 7), generator=gen)
    labels[0, 0] = 255
    conf = confusion_matrix(preds, labels, 3)
    valid = labels != 255
    expected = torch.bincount(labels[valid] * 3 + preds[valid], minlength=9).view(3, 3)
    assert torch.equal(conf, expected) and conf.sum().item() == 2 * 6 * 7 - 7
    plain = tiny_segmenter()
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    kinds = {type(m) for m in synced.modules()}
    assert SyncBatchNorm in kinds and BatchNorm2d not in kinds and torch.nn.SyncBatchNorm not in kinds
    assert {type(m) for m in tiny_segmenter(sync_bn=True).modules()} == kinds
    for (name, tensor), (_, before) in zip(synced.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(tensor, before), name
    assert isinstance(synced.backbone, BeitBackbone)


def test_config_rebuilds_and_saves_the_segmenter(tmp_path):
    model = tiny_segmenter()
    config = json.loads(json.dumps(model.config))  # JSON-serialisable
    assert config["name"] == MINI and config["img_size"] == [32, 32] and config["patch_size"] == 4
    rebuilt = create_segmenter(config["name"], **{k: v for k, v in config.items() if k != "name"})
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    out = save_pretrained(model, tmp_path / "seg")
    rebuilt.load_state_dict(load_file(out / "model.safetensors"))
    assert torch.equal(rebuilt.decode_head.conv_seg.weight, model.decode_head.conv_seg.weight)


def test_heads_alone():
    maps = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    head = UPerHead([8] * 4, channels=6, num_classes=3).train()
    assert head(maps).shape == (2, 3, 16, 16)
    assert len(head.psp_modules) == 4 and head.bottleneck.conv.in_channels == 8 + 4 * 6
    fcn = FCNHead(8, channels=4, num_classes=3, in_index=2)
    assert fcn(maps).shape == (2, 3, 4, 4) and fcn(maps[0]).shape == (2, 3, 16, 16)
    assert FCNHead(8, channels=4, num_classes=3, num_convs=2, concat_input=True)(maps).shape == (2, 3, 4, 4)

"""The detector side: torchvision's Mask R-CNN on the BEiT backbone (a step, layer decay), COCO evaluation
(ground truth scored as detections gives AP 100), saving and loading, and the one-line torchvision error."""

import importlib

import pytest
import torch
from conftest import write_tiny_coco

from engine.checkpoint import create_model_from_checkpoint, save_pretrained
from engine.config import ConfigError
from engine.data.coco import CocoDetection, DetEvalTransform, DetTrainTransform, collate_detection
from engine.detection import vision
from engine.detection.evaluation import coco_metrics, coco_results
from engine.detection.model import (
    LOSS_NAMES,
    DetectionLoss,
    create_detector,
    detection_param_groups,
    layer_id_for_detection,
)

MINI = dict(name="beit_mini_patch4_28", num_classes=3, input_size=32, depth=2, fpn_channels=16,
            proposals_per_image=50, rois_per_image=16)


def tiny_detector(**overrides):
    torch.manual_seed(0)
    config = {**MINI, **overrides}
    return create_detector(config.pop("name"), **config)


@pytest.fixture
def coco_dir(tmp_path):
    write_tiny_coco(tmp_path / "coco", size=40)
    return tmp_path / "coco"


def test_a_training_step_has_finite_losses_and_reaches_every_parameter(coco_dir):
    train = CocoDetection(coco_dir, "train")
    transform = DetTrainTransform(32, scale_range=(0.8, 1.0))
    images, targets = collate_detection([transform(*train[i], __import__("random").Random(i)) for i in range(2)])
    model = tiny_detector().train()
    loss, stats = DetectionLoss(model)(images.float() / 255, targets)
    loss.backward()
    assert torch.isfinite(loss) and stats.shape == (len(LOSS_NAMES) + 2,) and stats[-1] == 2
    assert torch.allclose(stats[0] / 2, loss.detach()) and torch.allclose(stats[1:-1].sum(), stats[0])
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"


def test_under_deepspeeds_bf16_cast_the_heads_compute_in_fp32(coco_dir):
    # DeepSpeed's bf16 casts every parameter: torchvision's nms has no bf16 kernel ("nms_kernel" not implemented
    # for 'BFloat16'), so the pyramid and heads run on fp32 views of their parameters, the encoder in bf16
    train = CocoDetection(coco_dir, "train")
    transform = DetTrainTransform(32, scale_range=(0.8, 1.0))
    images, targets = collate_detection([transform(*train[i], __import__("random").Random(i)) for i in range(2)])
    model = tiny_detector().train()
    names = list(model.state_dict())
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)  # deepspeed/runtime/engine.py's cast
    loss, _ = DetectionLoss(model)((images.float() / 255).bfloat16(), targets)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.bfloat16 and p.grad is not None and p.grad.dtype == torch.bfloat16
               for p in model.parameters())  # the fp32 views are gone after the call; gradients reach the params
    assert list(model.state_dict()) == names
    model.eval()
    with torch.no_grad():
        detections = model(list((images.float() / 255).bfloat16()))
    assert detections[0]["boxes"].dtype == torch.float32


def test_layer_decay_reaches_the_encoder_under_every_wrapper():
    # a wrapper that renamed backbone.body.encoder.* would put every encoder block at the full LR, silently
    model = tiny_detector()
    depth = model.get_num_layers()
    for prefix in ("", "module.", "model.", "module.model.", "model._orig_mod."):
        assert layer_id_for_detection(f"{prefix}backbone.body.encoder.blocks.0.attn.qkv.weight", depth) == 1
        assert layer_id_for_detection(f"{prefix}backbone.body.encoder.patch_embed.proj.weight", depth) == 0
        assert layer_id_for_detection(f"{prefix}backbone.body.fpn1.0.weight", depth) == depth + 1
        assert layer_id_for_detection(f"{prefix}roi_heads.mask_head.0.0.weight", depth) == depth + 1
    groups = detection_param_groups(DetectionLoss(model), 0.1, 0.5, depth)
    scale_of = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    assert scale_of["model.backbone.body.encoder.blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert scale_of["model.backbone.body.encoder.blocks.1.mlp.fc1.weight"] == 0.5 ** (depth - 1)
    assert scale_of["model.backbone.fpn.layer_blocks.0.0.weight"] == 1.0
    assert scale_of["model.rpn.head.conv.0.0.weight"] == 1.0
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


def test_ground_truth_scored_as_detections_gives_ap_100(coco_dir):
    val = CocoDetection(coco_dir, "val", training=False, category_ids=[3, 17, 90])
    transform = DetEvalTransform(96)  # twice the original: boxes and masks go back at half the size
    detections, metas = [], []
    for index in range(len(val)):
        image, target = val[index]
        _, meta = transform(image, target)
        masks = torch.zeros(len(target["labels"]), 1, 96, 96)  # probabilities in the padded input's pixels
        masks[:, :, :80, :96] = torch.from_numpy(target["masks"]).float()[:, None].repeat_interleave(2, dim=2) \
            .repeat_interleave(2, dim=3)
        detections.append({"boxes": torch.from_numpy(target["boxes"]) * meta["scale"],
                           "labels": torch.from_numpy(target["labels"]), "scores": torch.ones(len(masks)),
                           "masks": masks})
        metas.append(meta)
    results = coco_results(detections, metas, val.category_ids)
    assert {r["category_id"] for r in results} == {3, 17, 90}
    metrics = coco_metrics(val.coco, results, val.image_ids)
    assert metrics["box_AP"] == pytest.approx(100) and metrics["mask_AP"] == pytest.approx(100)
    assert metrics["box_APl"] is None  # no large object in the set: nothing to find, not an AP of 0
    detections[0]["labels"] = detections[0]["labels"].flip(0)  # two wrong classes
    worse = coco_metrics(val.coco, coco_results(detections, metas, val.category_ids), val.image_ids)
    assert worse["box_AP"] < 100 and worse["mask_AP"] < 100
    assert coco_metrics(val.coco, [], val.image_ids)["box_AP"] == 0.0


def test_a_saved_detector_loads_back_and_detects_the_same(tmp_path):
    model = tiny_detector().eval()
    save_pretrained(model, tmp_path / "detector")
    loaded = create_model_from_checkpoint(tmp_path / "detector").eval()
    images = list(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ours, theirs = model(images), loaded(images)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_torchvision_that_cannot_load_its_ops_is_one_line(monkeypatch):
    def broken(name, *args):
        raise RuntimeError("operator torchvision::nms does not exist")

    vision.require_torchvision.cache_clear()
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ConfigError, match="does not load its compiled ops.*torch===2.13.0"):
        vision.require_torchvision()
    vision.require_torchvision.cache_clear()

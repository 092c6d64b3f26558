"""Mask R-CNN on a BEiT backbone, the ViTDet way, built from torchvision's detection models.

    images [B, 3, S, S] (already resized and padded to the encoder's build size S by the data pipeline)
      → BeitBackbone (engine/segmentation/backbone.py: the encoder's tokens after 4 blocks through BEiT's
        multi-level neck: 4 maps [B, C, S/4 … S/32])
      → torchvision FeaturePyramidNetwork (fpn_channels, + a max-pooled level: p2 … p6)
      → torchvision MaskRCNN (RPN, RoIAlign box head and mask head)

The encoder is built for one input size, so torchvision's resize is switched off (`PaddedInputTransform`): the
pipeline does large-scale jitter in training and resizes the long side to S at evaluation (engine/data/coco.py);
the transform only normalises and batches. Under bf16 parameters (DeepSpeed) the backbone runs in bf16 and the FPN,
RPN and RoI heads in fp32 (`compute_in_float32`). Anchors scale with S: 32 … 512 px at S = 1024 (torchvision's default).
Layer-wise LR decay uses the segmentation rule on the encoder's names (`layer_id_for_detection`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from engine.detection.vision import require_torchvision
from engine.param_groups import param_groups
from engine.segmentation.backbone import WRAPPER_PREFIXES, create_backbone, layer_id_for_segmentation
from engine.segmentation.batchnorm import convert_sync_batchnorm

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
STAT_NAMES = ("loss", *LOSS_NAMES, "images")  # `DetectionLoss` stats: sums over the images, then their count
BACKBONE_BODY = "backbone.body."  # where the BEiT backbone sits in the detector's parameter names


def _as_float32(value):
    """Floating tensors in `value` (nested in tuples, lists, dicts and torchvision's ImageList) as fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(item) for item in value)
    if isinstance(value, dict):
        return type(value)((key, _as_float32(item)) for key, item in value.items())
    if hasattr(value, "tensors") and hasattr(value, "image_sizes"):  # torchvision's ImageList
        return type(value)(_as_float32(value.tensors), value.image_sizes)
    return value


def compute_in_float32(module: nn.Module) -> nn.Module:
    """Makes `module`'s forward run in fp32 whatever the dtype of its parameters and floating inputs; returns it.

    Under DeepSpeed's bf16 every parameter is bf16, but the pyramid and heads of a detector must not be: torchvision's
    nms has no bf16 kernel, and box coordinates in bf16 are off by up to 4 px at 1024. For the duration of a call
    (hooks: the state dict keeps its names) each parameter of the subtree is replaced by an fp32 view, through which
    its gradient flows back. The views are taken before the subtree's own pre-forward hooks run, so ZeRO-3's
    parameter gathering would come too late: detection refuses ZeRO-3 (engine/train/validation.py)."""
    swapped = []

    def before(_, args, kwargs):
        for sub in module.modules():
            for name, parameter in sub._parameters.items():
                if parameter is not None and parameter.is_floating_point() and parameter.dtype != torch.float32:
                    swapped.append((sub, name, parameter))
        for sub, name, parameter in swapped:
            sub._parameters[name] = parameter.float()
        return _as_float32(args), _as_float32(kwargs)

    def after(*_):
        while swapped:
            sub, name, parameter = swapped.pop()
            sub._parameters[name] = parameter

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True, always_call=True)
    return module


class BeitFPN(nn.Module):
    """BEiT backbone + torchvision's FPN → OrderedDict "0" … "3" (strides 4 … 32) and "pool" (64), each
    [B, out_channels, S/stride, S/stride]; `out_channels` is what torchvision's detectors read."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        ops = require_torchvision().ops
        self.body = body
        self.fpn = ops.FeaturePyramidNetwork(list(body.out_channels), out_channels,
                                             extra_blocks=ops.feature_pyramid_network.LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        features = self.body(images)  # {"p2" … "p5"}: 4 x [B, C, S/s, S/s]
        return self.fpn(OrderedDict((str(i), x) for i, x in enumerate(features.values())))


def padded_input_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """torchvision's GeneralizedRCNNTransform that normalises and batches (to exactly size × size) but never
    resizes: predictions come back in the padded input's pixels."""
    transform_class = require_torchvision().models.detection.transform.GeneralizedRCNNTransform

    class PaddedInputTransform(transform_class):
        def resize(self, image, target=None):
            return image, target

    return PaddedInputTransform(size, size, list(mean), list(std), size_divisible=size)


def create_detector(name: str, num_classes: int, input_size: int = 1024, out_indices: Sequence[int] | None = None,
                    fpn_channels: int = 256, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5), proposals_per_image: int = 2000,
                    rois_per_image: int = 512, sync_bn: bool = False, **overrides) -> nn.Module:
    """torchvision's MaskRCNN for `num_classes` object classes (labels 1..num_classes; 0 is background) on a BEiT
    backbone built for `input_size`² inputs. `name` and `overrides` go to `engine.create_backbone` (depth=,
    drop_path_rate=, attn_impl= …); `mean`/`std` normalise [0, 1] images; `proposals_per_image` RPN proposals are
    kept in training (half at evaluation) and `rois_per_image` of them sampled for the box loss (torchvision's and
    detectron2's defaults: 2000 and 512). The model carries `config` (its arguments) and `input_size`."""
    detection = require_torchvision().models.detection
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes, background excluded), got {num_classes}")
    if input_size % 32:
        raise ValueError(f"input_size must be a multiple of 32 (the p5 stride), got {input_size}")
    body = create_backbone(name, out_indices=out_indices, img_size=input_size, **overrides)
    smallest = max(4, round(32 * input_size / 1024))
    anchors = detection.anchor_utils.AnchorGenerator(tuple((smallest * 2 ** level,) for level in range(5)),
                                                     ((0.5, 1.0, 2.0),) * 5)
    # torchvision's heads, their widths tied to the pyramid's (its defaults at fpn_channels=256): narrow ones for a CPU
    box_width, classes = 4 * fpn_channels, num_classes + 1
    model = detection.MaskRCNN(
        BeitFPN(body, fpn_channels), rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=proposals_per_image,
        rpn_post_nms_top_n_train=proposals_per_image, rpn_pre_nms_top_n_test=proposals_per_image // 2,
        rpn_post_nms_top_n_test=proposals_per_image // 2, box_batch_size_per_image=rois_per_image,
        box_head=detection.faster_rcnn.TwoMLPHead(fpn_channels * 7 * 7, box_width),
        box_predictor=detection.faster_rcnn.FastRCNNPredictor(box_width, classes),
        mask_head=detection.mask_rcnn.MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1),
        mask_predictor=detection.mask_rcnn.MaskRCNNPredictor(fpn_channels, fpn_channels, classes))
    model.transform = padded_input_transform(input_size, mean, std)
    for part in (model.backbone.fpn, model.rpn, model.roi_heads):  # the encoder in bf16 when trained so, these fp32
        compute_in_float32(part)
    model.input_size = input_size
    model.config = {"name": name, "num_classes": num_classes, "input_size": input_size,
                    "out_indices": list(body.out_indices), "fpn_channels": fpn_channels, "mean": list(mean),
                    "std": list(std), "proposals_per_image": proposals_per_image, "rois_per_image": rois_per_image,
                    **overrides}
    model.get_num_layers = body.encoder.get_num_layers
    return convert_sync_batchnorm(model) if sync_bn else model


def layer_id_for_detection(name: str, num_layers: int) -> int:
    """Layer id of a detector parameter for layer-wise LR decay: the BEiT backbone's parameters
    (`backbone.body.…`, under any wrapper prefix) by `layer_id_for_segmentation` (encoder block b → b + 1, patch
    embedding 0, its neck num_layers + 1); the FPN, RPN and RoI heads num_layers + 1 (full LR)."""
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return layer_id_for_detection(name[len(prefix):], num_layers)
    if name.startswith(BACKBONE_BODY):
        return layer_id_for_segmentation(name[len(BACKBONE_BODY):], num_layers)
    return num_layers + 1


def detection_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None, num_layers: int,
                           skip_rel_pos_tables: bool = False) -> list[dict]:
    """`engine.param_groups.param_groups` of a detector with `layer_id_for_detection`."""
    return param_groups(model, weight_decay, layer_decay, num_layers, skip_rel_pos_tables, layer_id_for_detection)


class DetectionLoss(nn.Module):
    """What the training loop wraps: (images [B, 3, S, S] in [0, 1], targets) → (the sum of Mask R-CNN's five
    losses, stats [sum × B, each loss × B, B]) in the loop's `(loss, stats)` convention."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.model(list(images), targets)
        values = torch.stack([losses[name].float() for name in LOSS_NAMES])  # [5]
        total = values.sum()
        batch = images.new_tensor([images.shape[0]], dtype=torch.float32)
        return total, torch.cat([torch.cat([total[None], values]).detach() * batch, batch])

"""Semantic segmentation on a BEiT backbone (the official UperNet setting), plain PyTorch (no mmcv / mmseg).

- `backbone`: `create_backbone` / `BeitBackbone` (encoder tokens after 4 blocks → 4-level pyramid, strides p/4 … 2p),
  `default_out_indices`, `layer_id_for_segmentation` (layer-wise LR decay ids).
- `heads`: `UPerHead`, `FCNHead`, `ConvModule`.
- `batchnorm`: `BatchNorm2d` / `SyncBatchNorm` computing in fp32, `convert_sync_batchnorm`.
- `model`: `create_segmenter` / `SegmentationModel`, `segmentation_loss` / `SegmentationLoss`,
  `segmentation_param_groups`, `whole_inference`, `slide_inference`, `aug_inference`.
- `metrics`: `confusion_matrix`, `reduce_confusion`, `segmentation_metrics` (mIoU / mAcc / aAcc as mmseg).

Imported lazily (PEP 562), as `engine`: `engine.segmentation.metrics` does not pull in the model stack.
"""

import importlib

_EXPORTS = {
    "BeitBackbone": "engine.segmentation.backbone",
    "create_backbone": "engine.segmentation.backbone",
    "default_out_indices": "engine.segmentation.backbone",
    "layer_id_for_segmentation": "engine.segmentation.backbone",
    "ConvModule": "engine.segmentation.heads",
    "FCNHead": "engine.segmentation.heads",
    "UPerHead": "engine.segmentation.heads",
    "convert_sync_batchnorm": "engine.segmentation.batchnorm",
    "SegmentationLoss": "engine.segmentation.model",
    "SegmentationModel": "engine.segmentation.model",
    "aug_inference": "engine.segmentation.model",
    "create_segmenter": "engine.segmentation.model",
    "segmentation_loss": "engine.segmentation.model",
    "segmentation_param_groups": "engine.segmentation.model",
    "slide_inference": "engine.segmentation.model",
    "whole_inference": "engine.segmentation.model",
    "confusion_matrix": "engine.segmentation.metrics",
    "reduce_confusion": "engine.segmentation.metrics",
    "segmentation_metrics": "engine.segmentation.metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.segmentation' has no attribute {name!r}")

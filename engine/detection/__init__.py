"""Object detection and instance segmentation on a BEiT backbone: torchvision's Mask R-CNN, the ViTDet way.

- `model`: `create_detector` (BEiT backbone + BEiT's multi-level neck + torchvision FPN → MaskRCNN),
  `layer_id_for_detection` / `detection_param_groups` (layer-wise LR decay), `DetectionLoss`.
- `evaluation`: COCO results from detections (original-image boxes, RLE masks), box and mask AP with pycocotools.
- `vision`: `require_torchvision` (a one-line error where torchvision cannot load).

Imported lazily (PEP 562), as `engine`: importing the package does not import torchvision.
"""

import importlib

_EXPORTS = {
    "create_detector": "engine.detection.model",
    "layer_id_for_detection": "engine.detection.model",
    "detection_param_groups": "engine.detection.model",
    "DetectionLoss": "engine.detection.model",
    "coco_results": "engine.detection.evaluation",
    "coco_metrics": "engine.detection.evaluation",
    "require_torchvision": "engine.detection.vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

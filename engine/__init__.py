"""BEiT training engine. Public API: `create_model`, `list_models`, `load_checkpoint`, `create_backbone`.

`create_backbone(name, out_indices=None, **overrides)` wraps the classification encoder as a dense-prediction
backbone (a 4-level feature pyramid, strides 4/8/16/32 for 16 px patches); the segmentation model, loss, inference and
metrics built on it live in `engine.segmentation`, torchvision's Mask R-CNN on it in `engine.detection`.

Imported lazily (PEP 562) so that light submodules such as `engine.data` or `engine.config` do not pull in the
model and kernel stack, e.g. in DataLoader worker processes.
"""

import importlib

_EXPORTS = {
    "create_model": "engine.factory",
    "list_models": "engine.factory",
    "load_checkpoint": "engine.checkpoint",
    "create_backbone": "engine.segmentation.backbone",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

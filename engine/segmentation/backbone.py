"""BEiT as a dense-prediction backbone: the classification encoder's tokens after four blocks, turned into a feature
pyramid by the official neck (unilm `beit/semantic_segmentation/backbone/beit.py`), for UperNet and detectors.

Legend: B batch, C embed dim, p patch size, (h, w) = token grid = image size / p.

`create_backbone(name, out_indices, **overrides)` builds `engine.factory.create_model(name, num_classes=0, ...)`
(a `BeitForImageClassification`: per-layer relative position tables, no absolute position embedding) and wraps it
in `BeitBackbone`. The encoder keeps the official parameter names under `encoder.` (so `load_checkpoint(backbone.
encoder, path)` reads any checkpoint the engine reads, a pretraining one included: its shared table is expanded into
every block and resized to this grid), and its final norm, `fc_norm` and head, which dense tasks do not use, are
removed (no parameter without a gradient for DDP / DeepSpeed to complain about).

Neck, from the blocks' `[B, C, h, w]` maps (as the official one for p = 16; the same layers for any p % 4 == 0):
  fpn1 ConvTranspose2d(C, C, 2, 2) → BatchNorm2d → GELU → ConvTranspose2d(C, C, 2, 2)   stride p/4  ("p2")
  fpn2 ConvTranspose2d(C, C, 2, 2)                                                      stride p/2  ("p3")
  fpn3 Identity                                                                         stride p    ("p4")
  fpn4 MaxPool2d(2)                                                                     stride 2p   ("p5")
The names p2…p5 are the pyramid levels of p = 16 (stride 2^k); `strides` gives the real strides for any p. Neck and
head parameter names are the official ones (`fpn1.0.weight`, `fpn2.0.weight`, …); encoder ones carry `encoder.`.

Input size: the encoder is built for one image size (`img_size`, the training crop, e.g. 512 or 640) and its
`PatchEmbed` rejects any other size with a ValueError naming both; sliding-window inference
(`engine.segmentation.model.slide_inference`) feeds it windows of exactly that size.

Layer-wise LR decay (official `mmcv_custom/layer_decay_optimizer_constructor.py` of BEiT segmentation): patch
embedding / cls token / position embedding → 0, encoder block b → b + 1, everything else (the shared relative
position bias if any, the neck, the decode and auxiliary heads) → L + 1; see `layer_id_for_segmentation`.
"""

import logging
import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from engine.factory import create_model
from engine.model import BeitForImageClassification
from engine.param_groups import layer_id_for_vit
from engine.segmentation.batchnorm import BatchNorm2d

logger = logging.getLogger(__name__)

# official out_indices of the BEiT segmentation configs (upernet_beit_{base_12,large_24}_*.py), by depth
OFFICIAL_OUT_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}
FEATURE_NAMES = ("p2", "p3", "p4", "p5")
ENCODER_PREFIX = "encoder."
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP / DeepSpeed, a task's loss module, torch.compile
_PRETRAINING_SUFFIX = re.compile(r"_\d+k?_vocab$")  # `*_8k_vocab`, `*_256_vocab`: the MIM twin of a classifier


def default_out_indices(depth: int) -> list[int]:
    """The blocks whose tokens feed the neck: the official ones for depth 12 ([3, 5, 7, 11]) and 24
    ([7, 11, 15, 23]); for any other depth, four evenly spaced blocks ending at the last one:
    `ceil(depth * k / 4) - 1` for k = 1..4 (depth 2 → [0, 0, 1, 1], 6 → [1, 2, 4, 5], 8 → [1, 3, 5, 7]).
    A block may repeat when depth < 4; the last block is always one of them, so every block gets a gradient."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if depth in OFFICIAL_OUT_INDICES:
        return list(OFFICIAL_OUT_INDICES[depth])
    return [-(-depth * k // 4) - 1 for k in range(1, 5)]


def layer_id_for_segmentation(name: str, num_layers: int) -> int:
    """Layer id (0 … num_layers + 1) of a parameter of a `SegmentationModel` (`backbone.encoder.…`), of a
    `BeitBackbone` (`encoder.…`), or of either wrapped (`module.` DDP / DeepSpeed, `model.` a loss module such as
    `SegmentationLoss`, `_orig_mod.` torch.compile), for layer-wise LR decay.

    As the official BEiT segmentation constructor: encoder patch_embed / cls_token / pos_embed → 0, encoder
    `blocks.b` → b + 1, everything else (shared `rel_pos_bias`, the neck `fpn1..4`, decode and auxiliary heads)
    → num_layers + 1. The LR scale of id i is `layer_decay ** (num_layers + 1 - i)`
    (`engine.param_groups.layer_scales`)."""
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):  # wrappers in any order and nesting
            return layer_id_for_segmentation(name[len(prefix):], num_layers)
    if name.startswith("backbone."):
        name = name[len("backbone."):]
    if name.startswith(ENCODER_PREFIX):
        return layer_id_for_vit(name[len(ENCODER_PREFIX):], num_layers)
    return num_layers + 1


def _patch_side(encoder: BeitForImageClassification) -> int:
    patch_h, patch_w = encoder.patch_embed.patch_size
    if patch_h != patch_w or patch_h % 4:
        raise ValueError(f"the segmentation neck needs a square patch size divisible by 4 (strides p/4 … 2p), got "
                         f"{(patch_h, patch_w)}")
    return patch_h


class BeitBackbone(nn.Module):
    """`backbone(images [B, 3, H, W])` → `{"p2": [B, C, 4h, 4w], "p3": [B, C, 2h, 2w], "p4": [B, C, h, w],
    "p5": [B, C, h/2, w/2]}` (an ordered dict, finest first; h = H / p). `H, W` must be the build `img_size`.

    Attributes for detection frameworks: `feature_names`, `out_channels` ([C] * 4), `strides` ([p/4, p/2, p, 2p],
    i.e. [4, 8, 16, 32] for p = 16), `out_indices`, `img_size`, `patch_size`, `embed_dim`.
    """

    def __init__(self, encoder: BeitForImageClassification, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, BeitForImageClassification):
            raise ValueError(f"BeitBackbone wraps a BeitForImageClassification (per-layer relative position tables), "
                             f"got {type(encoder).__name__}; build it with create_backbone(name)")
        self.patch_size = patch = _patch_side(encoder)
        depth = len(encoder.blocks)
        indices = default_out_indices(depth) if out_indices is None else [int(i) for i in out_indices]
        indices = [i + depth if i < 0 else i for i in indices]
        if len(indices) != 4 or not all(0 <= i < depth for i in indices) or indices != sorted(indices):
            raise ValueError(f"out_indices must be 4 non-decreasing block indices in [-{depth}, {depth}) (one per "
                             f"pyramid level, finest first), got {list(out_indices)}")
        if indices[-1] < depth - 1:
            # blocks after the last tapped one would get no gradient (DDP / DeepSpeed complain): drop them
            logger.warning("out_indices %s end before the last block %d: blocks %d..%d removed from the encoder",
                           indices, depth - 1, indices[-1] + 1, depth - 1)
            del encoder.blocks[indices[-1] + 1:]
            encoder.config["depth"] = len(encoder.blocks)
        # unused by dense tasks: no parameter may stay without a gradient
        encoder.norm = nn.Identity()
        encoder.fc_norm = None
        encoder.head = nn.Identity()
        self.encoder = encoder
        self.out_indices = indices
        self.embed_dim = dim = encoder.embed_dim
        self.img_size = tuple(encoder.patch_embed.img_size)
        self.feature_names = list(FEATURE_NAMES)
        self.out_channels = [dim] * 4
        self.strides = [patch // 4, patch // 2, patch, patch * 2]
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            BatchNorm2d(dim),  # fp32 arithmetic under bf16 parameters (engine/segmentation/batchnorm.py)
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))  # official names fpn2.0.*
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.encoder.forward_intermediates(images, self.out_indices)  # 4 x [B, C, h, w]
        necks = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return {name: neck(x) for name, neck, x in zip(self.feature_names, necks, maps)}

    def get_num_layers(self) -> int:
        return self.encoder.get_num_layers()

    def no_weight_decay(self) -> set[str]:
        """The encoder's exempt parameters, named relative to this module (`encoder.cls_token` …)."""
        return {ENCODER_PREFIX + name for name in self.encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def create_backbone(name: str, out_indices: Sequence[int] | None = None, **model_overrides) -> BeitBackbone:
    """`BeitBackbone` around `create_model(name, num_classes=0, **model_overrides)`.

    `name` is a registered classification model (e.g. `beit_base_patch16_224`, `beit_large_patch16_224`; a
    pretraining name `*_8k_vocab` / `*_256_vocab` is mapped to its classification twin); overrides use the
    engine's names (`img_size=512`, `depth=`, `attn_impl=`, `drop_path_rate=`, `layer_scale_init_value=`,
    `grad_checkpointing=`), `input_size=` is accepted for `img_size`. `out_indices` defaults to
    `default_out_indices(depth)`. Load pretrained weights with
    `engine.checkpoint.load_checkpoint(backbone.encoder, path)`.
    """
    name = _PRETRAINING_SUFFIX.sub("", name)  # beit_base_patch16_224_8k_vocab → beit_base_patch16_224
    if "input_size" in model_overrides:
        if "img_size" in model_overrides:
            raise ValueError("give either img_size or input_size (the same thing), not both")
        model_overrides["img_size"] = model_overrides.pop("input_size")
    if "num_classes" in model_overrides:
        raise ValueError("a backbone has no classifier: num_classes is not an argument of create_backbone")
    encoder = create_model(name, num_classes=0, **model_overrides)
    backbone = BeitBackbone(encoder, out_indices)
    logger.info("segmentation backbone %s: img_size %s, out_indices %s, strides %s, %.1fM params", name,
                backbone.img_size, backbone.out_indices, backbone.strides,
                sum(p.numel() for p in backbone.parameters()) / 1e6)
    return backbone

"""Decode heads of the official BEiT segmentation configs (`upernet_beit.py`), as mmseg 0.x builds them, in plain
PyTorch: `UPerHead` (decode head) and `FCNHead` (auxiliary head), from `ConvModule` (Conv → BN → ReLU).

Legend: B batch, C_i channels of input level i, C head channels, K classes, (h_i, w_i) spatial size of level i.

Initialisation as mmcv: the convolution of a `ConvModule` is Kaiming-normal (fan_out, ReLU) with zero bias, its
BatchNorm (1, 0); the classifier `conv_seg` is normal(std 0.01) with zero bias.

BatchNorm: every BN here is engine/segmentation/batchnorm.py's `BatchNorm2d` (statistics of the local batch, fp32
arithmetic under bf16/fp16 parameters). With several ranks, convert the whole model to its `SyncBatchNorm` before
wrapping it (what the official runs use, and what `create_segmenter(...,
sync_bn=True)` does through `convert_sync_batchnorm`): the pooling pyramid's 1×1 level has one value per image and
channel, so BatchNorm in training needs more than one image per BN group (a per-rank batch of 1 without SyncBN raises
"Expected more than 1 value per channel when training").
"""

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.segmentation.batchnorm import BatchNorm2d
from engine.sharded import gathered

CONV_SEG_STD = 0.01  # mmseg BaseDecodeHead.init_weights: normal_init(conv_seg, mean=0, std=0.01)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False (mmseg's `resize` as the BEiT configs use it)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """mmcv's ConvModule with `norm_cfg=BN, act_cfg=ReLU`: Conv2d (no bias: BN follows) → BatchNorm2d → ReLU.
    Parameter names `conv.weight`, `bn.weight`/`bn.bias` (mmcv names the norm `bn` too)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        with gathered([self.conv.weight]):  # ZeRO-3's zero.Init partitioned it when the Conv2d was built
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class DecodeHead(nn.Module):
    """What mmseg's BaseDecodeHead adds to a head: Dropout2d then the 1×1 classifier `conv_seg` (C → K)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 1 or channels < 1:
            raise ValueError(f"need channels >= 1 and num_classes >= 1, got channels={channels}, "
                             f"num_classes={num_classes}")
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        with gathered(self.conv_seg.parameters()):
            nn.init.normal_(self.conv_seg.weight, std=CONV_SEG_STD)
            nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(features))  # [B, K, h, w]


class PPM(nn.ModuleList):
    """Pooling pyramid: per scale s, adaptive average pool to s×s → 1×1 ConvModule → bilinear back to the input size.
    `ppm(x [B, C_in, h, w])` → list of `[B, C, h, w]`, one per scale."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1))
                         for scale in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[2:]) for stage in self]


class UPerHead(DecodeHead):
    """UperNet (mmseg `UPerHead`): PPM on the coarsest level, FPN top-down over the others, fused at the finest.

    `head([x_0 … x_3])` (`x_i` `[B, C_i, h_i, w_i]`, finest first) → logits `[B, K, h_0, w_0]`:
      psp: bottleneck 3×3 ConvModule on concat(x_3, PPM(x_3)) → lateral 3;
      laterals 0..2: 1×1 ConvModule; top-down: lateral i-1 += bilinear(lateral i) from the top;
      fpn outs 0..2: 3×3 ConvModule of lateral i, out 3 = lateral 3; all resized to level 0 and concatenated;
      fpn_bottleneck 3×3 ConvModule (4C → C) → Dropout2d → conv_seg 1×1 (C → K).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_channels = list(in_channels)
        if len(self.in_channels) < 2:
            raise ValueError(f"UPerHead needs at least 2 input levels, got in_channels={self.in_channels}")
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = PPM(self.pool_scales, self.in_channels[-1], channels)
        self.bottleneck = ConvModule(self.in_channels[-1] + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} feature maps, got {len(inputs)}")
        top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))  # [B, C, h_3, w_3]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0]] + [resize(out, size) for out in outs[1:]], dim=1)  # [B, 4C, h_0, w_0]
        return self.cls_seg(self.fpn_bottleneck(fused))  # [B, K, h_0, w_0]


class FCNHead(DecodeHead):
    """mmseg `FCNHead` on one level (`in_index`): `num_convs` k×k ConvModules (optionally `conv_cat` on
    concat(input, convs)) → Dropout2d → conv_seg. The BEiT configs' auxiliary head: in_index=2 (stride p),
    channels=256, num_convs=1, concat_input=False, dropout 0.1, loss weight 0.4.

    `head([x_0 … x_3])` (or one tensor) → logits `[B, K, h_i, w_i]` of level `in_index`.
    """

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, in_index: int = 2,
                 num_convs: int = 1, concat_input: bool = False, dropout: float = 0.1, kernel_size: int = 3) -> None:
        super().__init__(channels, num_classes, dropout)
        if num_convs < 0 or (num_convs == 0 and in_channels != channels):
            raise ValueError(f"num_convs must be >= 0 (0 only when in_channels == channels), got num_convs="
                             f"{num_convs}, in_channels={in_channels}, channels={channels}")
        self.in_channels = in_channels
        self.in_index = in_index
        padding = kernel_size // 2
        convs = [ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=padding)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=padding) \
            if concat_input else None

    def forward(self, inputs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[self.in_index]  # [B, C_in, h, w]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)  # [B, K, h, w]

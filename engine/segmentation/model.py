"""UperNet on a BEiT backbone (the official BEiT semantic-segmentation model, `upernet_beit.py`), its loss, parameter
groups with layer-wise LR decay, and mmseg's inference modes (whole image, sliding window, multi-scale + flip).

Legend: B batch, K classes, (H, W) image size, C encoder width, p patch size.

`create_segmenter("beit_base_patch16_224", num_classes=150, img_size=512)` builds
`SegmentationModel(backbone, decode_head=UPerHead([C] * 4, channels=C), auxiliary_head=FCNHead(C, 256, in_index=2))`
as the official configs (channels 768 for BEiT-B, 1024 for BEiT-L; auxiliary loss weight 0.4). Pretrained weights go
into the encoder: `engine.checkpoint.load_checkpoint(model.backbone.encoder, path)` (pretraining or fine-tuned
checkpoints, any image size: relative position tables are resized to the build grid).

Image size: the encoder is built for one size (`img_size`, the training crop). Training crops and the windows of
`slide_inference` have that size; `whole_inference` accepts only that size (ValueError otherwise), so evaluate
other sizes with `slide_inference` (the official test mode: crop 512 / stride 341, or 640 / 426).

Loss (`segmentation_loss`): pixel cross-entropy with `ignore_index`, decode head + `aux_weight` × auxiliary head,
both at the label size. `average="valid"` (default) divides by the number of labelled pixels (PyTorch's
`ignore_index` mean, mmseg's `avg_non_ignore=True`); `average="all"` divides by all pixels, what mmseg does by default
(`avg_non_ignore=False`) and so what the official BEiT runs optimised. No host sync either way.
"""

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.param_groups import param_groups
from engine.segmentation.backbone import BeitBackbone, create_backbone, layer_id_for_segmentation
from engine.segmentation.batchnorm import convert_sync_batchnorm
from engine.segmentation.heads import FCNHead, UPerHead, resize

IGNORE_INDEX = 255
AUX_WEIGHT = 0.4
AUX_IN_INDEX = 2  # the auxiliary FCN head reads the stride-p level ("p4")
STAT_NAMES = ("loss", "decode_loss", "aux_loss", "pixels")  # `segmentation_loss` stats: sums, then their weight
AVERAGES = ("valid", "all")


class SegmentationModel(nn.Module):
    """`model(images [B, 3, H, W])` → decode-head logits `[B, K, H, W]` (bilinear, align_corners=False, as mmseg);
    `model.forward_train(images)` → (logits, auxiliary logits or None), both `[B, K, H, W]`.
    `H, W` must be the encoder's build size (`model.img_size`)."""

    def __init__(self, backbone: BeitBackbone, decode_head: UPerHead, auxiliary_head: FCNHead | None = None,
                 aux_weight: float = AUX_WEIGHT, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if auxiliary_head is not None and auxiliary_head.num_classes != decode_head.num_classes:
            raise ValueError(f"decode head has {decode_head.num_classes} classes, auxiliary head "
                             f"{auxiliary_head.num_classes}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_weight = aux_weight if auxiliary_head is not None else 0.0
        self.ignore_index = ignore_index
        self.num_classes = decode_head.num_classes
        self.img_size = backbone.img_size

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(images).values())  # 4 x [B, C, H/stride, W/stride], finest first

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.decode_head(self._features(images)), images.shape[2:])  # [B, K, H, W]

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self._features(images)
        logits = resize(self.decode_head(features), images.shape[2:])  # [B, K, H, W]
        if self.auxiliary_head is None:
            return logits, None
        return logits, resize(self.auxiliary_head(features), images.shape[2:])  # [B, K, H, W]

    def get_num_layers(self) -> int:
        return self.backbone.get_num_layers()

    def no_weight_decay(self) -> set[str]:
        """Exempt encoder parameters, named relative to this module (`backbone.encoder.cls_token` …)."""
        return {"backbone." + name for name in self.backbone.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def create_segmenter(backbone_name: str, num_classes: int, out_indices: Sequence[int] | None = None,
                     channels: int | None = None, aux_channels: int | None = 256, aux_weight: float = AUX_WEIGHT,
                     sync_bn: bool = False, ignore_index: int = IGNORE_INDEX, pool_scales: Sequence[int] = (1, 2, 3, 6),
                     dropout: float = 0.1, **model_overrides) -> SegmentationModel:
    """UperNet + FCN auxiliary head on `create_backbone(backbone_name, out_indices, **model_overrides)`.

    `channels` (UPerHead width) defaults to the encoder width (official: 768 for B, 1024 for L); the heads read
    `[C] * 4` channels. The auxiliary head (FCN, `aux_channels` wide, on the stride-p level) is left out when
    `aux_channels` is None or `aux_weight` is 0. `sync_bn=True` (set it when world_size > 1) converts every
    BatchNorm (neck and heads) to SyncBatchNorm. Overrides go to `create_model` (`img_size=512`/`input_size=512`,
    `drop_path_rate=0.1`, `attn_impl=`, `depth=`, `grad_checkpointing=` …).

    `model.config` records the arguments (JSON-serialisable, `name` = backbone_name, img_size and patch_size
    resolved), so `engine.checkpoint.save_pretrained(model, dir)` (and `engine.train.state.save_model`) can write it
    and `create_segmenter(c["name"], **{k: v for k, v in c.items() if k != "name"})` rebuilds it; read the weights
    back with `model.load_state_dict(safetensors.torch.load_file(dir / "model.safetensors"))` (`load_checkpoint`
    is for encoder checkpoints: `load_checkpoint(model.backbone.encoder, path)`).
    """
    backbone = create_backbone(backbone_name, out_indices, **model_overrides)
    width = backbone.embed_dim
    decode_head = UPerHead(backbone.out_channels, channels or width, num_classes, pool_scales=pool_scales,
                           dropout=dropout)
    auxiliary_head = None
    if aux_channels and aux_weight > 0:
        auxiliary_head = FCNHead(backbone.out_channels[AUX_IN_INDEX], aux_channels, num_classes, in_index=AUX_IN_INDEX,
                                 num_convs=1, concat_input=False, dropout=dropout)
    model = SegmentationModel(backbone, decode_head, auxiliary_head, aux_weight, ignore_index)
    overrides = {key: value for key, value in model_overrides.items() if key != "input_size"}
    model.config = dict(name=backbone_name, num_classes=num_classes, out_indices=backbone.out_indices,
                        channels=decode_head.channels, aux_channels=aux_channels if auxiliary_head else None,
                        aux_weight=model.aux_weight, ignore_index=ignore_index, pool_scales=list(pool_scales),
                        dropout=dropout, **{**overrides, "img_size": list(backbone.img_size),
                                            "patch_size": backbone.patch_size})
    return convert_sync_batchnorm(model) if sync_bn else model


# ------------------------------------------------------------------------------------------------------------- loss


def _pixel_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy over labelled pixels (fp32); logits are resized to the label size if they differ."""
    if logits.shape[2:] != labels.shape[1:]:
        logits = resize(logits, labels.shape[1:])
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def segmentation_loss(logits: torch.Tensor, aux_logits: torch.Tensor | None, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, aux_weight: float = AUX_WEIGHT, average: str = "valid"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, aux_logits `[B, K, H, W]` (aux may be None), labels `[B, H, W]` int64 (`ignore_index` = unlabelled)
    → (loss, stats). loss = CE(logits) + aux_weight · CE(aux_logits), each a mean over the labelled pixels
    (`average="valid"`) or over all pixels (`"all"`, mmseg's default). stats (device, fp32, no host sync) =
    [loss·n, decode_loss·n, aux_loss·n, n] with n the denominator (labelled pixels, or all pixels), the loop's
    format (`STAT_NAMES`). A batch without a labelled pixel gives a loss of 0, never NaN."""
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; choose one of {AVERAGES}")
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [B, H, W] with B = {logits.shape[0]}, got {list(labels.shape)}")
    labels = labels.long()
    if average == "valid":
        count = (labels != ignore_index).sum().float()  # [] on the device
    else:
        count = torch.full((), float(labels.numel()), device=labels.device)
    denominator = count.clamp_min(1.0)
    decode = _pixel_ce(logits, labels, ignore_index) / denominator
    aux = _pixel_ce(aux_logits, labels, ignore_index) / denominator if aux_logits is not None \
        else torch.zeros_like(decode)
    loss = decode + aux_weight * aux if aux_logits is not None else decode
    stats = torch.stack([loss.detach(), decode.detach(), aux.detach()]) * count
    return loss, torch.cat([stats, count.reshape(1)])


class SegmentationLoss(nn.Module):
    """What DeepSpeed / DDP wrap: `(images [B, 3, H, W], labels [B, H, W])` → `segmentation_loss` (loss, stats)
    with the model's `ignore_index` and `aux_weight`; `stat_names` = `STAT_NAMES`."""

    stat_names = STAT_NAMES

    def __init__(self, model: SegmentationModel, average: str = "valid") -> None:
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"unknown average {average!r}; choose one of {AVERAGES}")
        self.model = model
        self.average = average

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux_logits = self.model.forward_train(images)
        return segmentation_loss(logits, aux_logits, labels, self.model.ignore_index, self.model.aux_weight,
                                 self.average)


# ------------------------------------------------------------------------------------------------ parameter groups


def segmentation_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                              num_layers: int | None = None, skip_rel_pos_tables: bool = False) -> list[dict]:
    """`engine.param_groups.param_groups` for a `SegmentationModel` (or a `BeitBackbone`, or either wrapped):
    the same groups (`layer_{id}_{decay|no_decay}`, `weight_decay`, `lr_scale`, `param_names`) and no-decay rule
    (`is_no_decay`: 1-D parameters, i.e. biases, LayerNorm/BatchNorm, layer-scale gammas; cls token; pos embed),
    with layer ids from `layer_id_for_segmentation` (neck and heads at num_layers + 1, full LR).
    `num_layers` defaults to `model.get_num_layers()`. Frozen parameters are left out."""
    if layer_decay is not None and num_layers is None:
        num_layers = model.get_num_layers()
    return param_groups(model, weight_decay, layer_decay, num_layers, skip_rel_pos_tables, layer_id_for_segmentation)


# -------------------------------------------------------------------------------------------------------- inference


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} must be a positive int or a (height, width) pair, got {value!r}")
    return pair


@torch.no_grad()
def whole_inference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`model(images)` as fp32 logits `[B, K, H, W]`. The images must have the encoder's build size
    (`model.img_size`); any other size is a ValueError (use `slide_inference`, or resize the images)."""
    expected = getattr(model, "img_size", None)
    if expected is not None and tuple(images.shape[-2:]) != tuple(expected):
        raise ValueError(f"whole inference needs images of the size the encoder was built for, img_size="
                         f"{tuple(expected)}, got {tuple(images.shape[-2:])}: use slide_inference (windows of the "
                         "build size) or resize the images")
    return model(images).float()


@torch.no_grad()
def slide_inference(model: nn.Module, images: torch.Tensor, num_classes: int | None,
                    crop_size: int | Sequence[int], stride: int | Sequence[int]) -> torch.Tensor:
    """mmseg's sliding-window inference → fp32 logits `[B, K, H, W]` (the average over the windows covering a pixel).

    Windows of `crop_size` every `stride` (`h_grids = max(H - crop + stride - 1, 0) // stride + 1`, same for w); a
    window running past the image is shifted back inside it (`y1 = max(y2 - crop, 0)`), so windows are never padded.
    An image smaller than the crop (either side) is padded with zeros at the bottom/right to the crop size and the
    logits are cropped back. `model(window)` must return `[B, K, crop_h, crop_w]` logits (a `SegmentationModel` does);
    `num_classes` None takes K from the first window. Set `model.eval()` first: this does not change its mode.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {(stride_h, stride_w)} larger than crop_size {(crop_h, crop_w)} leaves pixels that "
                         "no window covers")
    batch, _, height, width = images.shape
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))  # zeros: the mean colour of normalised images
    full_h, full_w = images.shape[2:]
    h_grids = max(full_h - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(full_w - crop_w + stride_w - 1, 0) // stride_w + 1
    logits_sum = None
    count = torch.zeros(1, 1, full_h, full_w, device=images.device)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * stride_h + crop_h, full_h)
            x2 = min(w_idx * stride_w + crop_w, full_w)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            window = model(images[:, :, y1:y2, x1:x2]).float()  # [B, K, crop_h, crop_w]
            if logits_sum is None:
                classes = window.shape[1] if num_classes is None else num_classes
                logits_sum = images.new_zeros((batch, classes, full_h, full_w), dtype=torch.float32)
            if window.shape != (batch, logits_sum.shape[1], y2 - y1, x2 - x1):
                raise ValueError(f"the model returned {list(window.shape)} for a window of {[y2 - y1, x2 - x1]} "
                                 f"pixels; expected [{batch}, {logits_sum.shape[1]}, {y2 - y1}, {x2 - x1}]")
            logits_sum[:, :, y1:y2, x1:x2] += window
            count[:, :, y1:y2, x1:x2] += 1
    return (logits_sum / count)[:, :, :height, :width]


@torch.no_grad()
def aug_inference(model: nn.Module, images: torch.Tensor, sizes: Sequence[Sequence[int]] | None = None,
                  flip: bool = False, crop_size: int | Sequence[int] | None = None,
                  stride: int | Sequence[int] | None = None, mode: str = "slide",
                  out_size: Sequence[int] | None = None, num_classes: int | None = None) -> torch.Tensor:
    """mmseg's `aug_test`: class probabilities `[B, K, *out_size]` (fp32) averaged over sizes × (flips).

    For each `(h, w)` of `sizes` (default: the images' own) the images `[B, 3, H, W]` are resized (bilinear,
    align_corners=False) to it; with `flip` the horizontally flipped images are inferred too (their logits flipped
    back). Each inference (`mode` "slide": `slide_inference(crop_size, stride)`; "whole": `whole_inference`, which
    needs the build size) is resized to `out_size` (default (H, W), e.g. the label size), softmaxed, and the
    probabilities are averaged. The official multi-scale test: the sizes of `engine.data.segmentation.
    multi_scale_sizes` (ratios 0.5 … 1.75 of the original image), flip=True.
    """
    if mode not in ("slide", "whole"):
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("mode='slide' needs crop_size and stride")
    height, width = images.shape[2:]
    sizes = [(height, width)] if sizes is None else [tuple(size) for size in sizes]
    if not sizes:
        raise ValueError("sizes must name at least one (h, w) to infer at")
    out_size = (height, width) if out_size is None else tuple(out_size)
    total, runs = None, 0
    for size in sizes:
        scaled = images if size == (height, width) else resize(images, size)
        for flipped in ((False, True) if flip else (False,)):
            inputs = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                logits = slide_inference(model, inputs, num_classes, crop_size, stride)
            else:
                logits = whole_inference(model, inputs)
            if flipped:
                logits = logits.flip(-1)
            probs = resize(logits, out_size).softmax(dim=1)  # [B, K, *out_size]
            total = probs if total is None else total + probs
            runs += 1
    return total / runs

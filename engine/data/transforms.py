"""Image transforms of BEiT pretraining (two views from one crop), fine-tuning (timm's train pipeline) and eval.

PIL + numpy + torch only; the sampling algorithms follow torchvision (ColorJitter, RandomResizedCrop) and timm
(RandAugment, RandomErasing). Images come in as uint8 `[H, W, 3]` arrays (the datasets' output; RGB PIL images are
accepted too) and leave as uint8 tensors; engine/data/pixels.py says why and how they are resampled.

Randomness: every transform is called as `transform(img, rng)` and draws ONLY from `rng`, a `random.Random`
(torch noise, for random erasing, comes from a torch.Generator seeded from `rng`). The MIM / classification
datasets pass an rng seeded from (seed, epoch, index), which makes a sample independent of worker count and call
order. With `rng=None` a fresh `random.Random` is seeded from Python's global `random` module, so `random.seed(s)`
makes such calls reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from engine.data.color_jitter import ColorJitter, apply_color_jitter
from engine.data.pixels import Box, as_hwc, check_interpolation, hflip, resize, resized_crop
from engine.data.randaugment import RandAugment

# The official default for pretraining and fine-tuning (--imagenet_default_mean_and_std off); fine-tuning and eval
# must use the statistics the model was pretrained with.
BEIT_DEFAULT_MEAN = (0.5, 0.5, 0.5)
BEIT_DEFAULT_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)  # used for the official IN-1k pretraining and fine-tuning
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def mean_std(imagenet_mean_std: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants: ImageNet's (the official IN-1k pretraining's) or BEiT's 0.5/0.5 (the official code's
    default: IN-22k pretraining, every official fine-tuning command and the released fine-tuned weights)."""
    if imagenet_mean_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return BEIT_DEFAULT_MEAN, BEIT_DEFAULT_STD


def resolve_rng(rng: random.Random | None) -> random.Random:
    """`rng`, or a fresh generator seeded from Python's global `random` state when None."""
    return rng if rng is not None else random.Random(random.getrandbits(64))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, any device) → float32 in [0, 1] (torchvision ToTensor's scaling)."""
    return pixels.float().div_(255.0)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[..., 3, H, W] → (x - mean) / std per channel, on the tensor's device. The constants stay Python scalars: a
    small tensor built from them would be a pageable host-to-device copy, which waits for the device, every step."""
    out = torch.empty_like(tensor)
    for channel, (m, s) in enumerate(zip(mean, std)):
        torch.div(tensor.select(-3, channel) - m, s, out=out.select(-3, channel))
    return out


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_range(name: str, value: Sequence[float], lowest: float = 0.0) -> tuple[float, float]:
    if len(value) != 2 or not lowest < value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with {lowest} < low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean!r}, std={std!r}")
    return tuple(map(float, mean)), tuple(map(float, std))


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> Box:
    """torchvision RandomResizedCrop.get_params: up to 10 draws of (area fraction in `scale`, log-uniform aspect
    w/h in `ratio`) that fit the image, else a centre crop of the whole image clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """BEiT pretraining views: ColorJitter → horizontal flip → ONE RandomResizedCrop box giving two views.

    Args:
        input_size: patch-view side (BEiT: 224), resampled bicubic.
        second_input_size: tokenizer-view side (BEiT: 112), resampled with `second_interpolation`.
        color_jitter: brightness = contrast = saturation strength (0 disables).
        scale, ratio: RandomResizedCrop area-fraction and aspect (w/h) ranges.
        mean, std: patch-view normalisation (default 0.5; IMAGENET_DEFAULT_MEAN / _STD for the ImageNet option).
        interpolation, second_interpolation: resampling of the two views.
        hflip: horizontal flip probability.

    The draws are the official ones, in the official order (jitter order and factors, flip, crop box), taken from the
    image size alone (`draw`). The work is reordered for speed: each view is resampled once from the crop box of the
    decoded image (`views_from_box`), and the colour jitter, a per-pixel map, is applied to the small views in batch
    on the device (engine/data/color_jitter.py), instead of to the whole image in the worker.

    `transform(img, rng)` → (patch_view uint8 [3, input_size, input_size], tokenizer_view uint8
    [3, second_input_size, second_input_size], jitter params float32 [7]), what DataLoader workers ship;
    `model_inputs` finishes a batch on its device: jitter, then the patch view normalised and the tokenizer view
    through the dVAE's `map_pixels` (into [0.1, 0.9]).
    """

    def __init__(self, input_size: int = 224, second_input_size: int = 112, color_jitter: float = 0.4,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 mean: Sequence[float] = BEIT_DEFAULT_MEAN, std: Sequence[float] = BEIT_DEFAULT_STD,
                 interpolation: str = "bicubic", second_interpolation: str = "lanczos", hflip: float = 0.5):
        self.input_size = _check_positive_int("input_size", input_size)
        self.second_input_size = _check_positive_int("second_input_size", second_input_size)
        self.color_jitter = ColorJitter(color_jitter, color_jitter, color_jitter)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.mean, self.std = _check_mean_std(mean, std)
        self.interpolation = check_interpolation(interpolation)
        self.second_interpolation = check_interpolation(second_interpolation)
        self.hflip = hflip

    def draw(self, width: int, height: int, rng: random.Random) -> tuple[list[tuple[int, float]], bool, Box]:
        """The random choices for a `width` x `height` image → (jitter draws, flipped, crop box of the flipped
        image), drawn as the official pipeline draws them (ColorJitter, RandomHorizontalFlip, RandomResizedCrop)."""
        jitter = self.color_jitter.draw(rng)
        flipped = rng.random() < self.hflip
        return jitter, flipped, random_resized_crop_box(width, height, self.scale, self.ratio, rng)

    def views_from_box(self, pixels: np.ndarray, box: Box, flipped: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of `box` of uint8 `[H, W, 3]` pixels (mirrored first when `flipped`: the box is then one of the
        mirrored image) → (patch_view uint8 [3, S, S], tokenizer_view uint8 [3, s, s])."""
        top, left, height, width = box
        if flipped:  # the box of the mirrored image is the mirrored box of the image; resample, then mirror the views
            box = (top, pixels.shape[1] - left - width, height, width)
        views = (resized_crop(pixels, box, self.input_size, self.interpolation),
                 resized_crop(pixels, box, self.second_input_size, self.second_interpolation))
        return tuple((hflip(view) if flipped else view).contiguous() for view in views)

    def model_inputs(self, patch_views: torch.Tensor, tokenizer_views: torch.Tensor, jitter: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views `[B, 3, S, S]`, `[B, 3, s, s]` and jitter params `[B, 7]` on the device → (patch views
        jittered and normalised, in `dtype`; tokenizer views jittered, fp32, through `map_pixels`)."""
        from engine.tokenizer.dalle import map_pixels

        patches = apply_color_jitter(patch_views.float(), jitter).div_(255.0)
        pixels = apply_color_jitter(tokenizer_views.float(), jitter).div_(255.0)
        return normalize(patches, self.mean, self.std).to(dtype), map_pixels(pixels)

    def __call__(self, img: Image.Image | np.ndarray, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = as_hwc(img)
        jitter, flipped, box = self.draw(pixels.shape[1], pixels.shape[0], resolve_rng(rng))
        return (*self.views_from_box(pixels, box, flipped), self.color_jitter.params(jitter, pixels))


class RandomErasing:
    """timm RandomErasing, split between worker and device: with probability `probability`, one rectangle of area
    fraction U(min_area, max_area) and log-uniform aspect in [min_aspect, 1/min_aspect] (10 attempts) is drawn in the
    worker (`draw_box`), and the normalised batch is erased on the device (`erase`).

    mode "pixel": per-pixel N(0, 1) noise; "rand": one N(0, 1) colour per channel; "const": zeros. The noise comes
    from the device generator the step passes (seeded by seed, step and rank, so a resumed run erases identically).
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        if not 0 <= probability <= 1:
            raise ValueError(f"random erasing probability must be in [0, 1], got {probability}")
        self.probability = probability
        self.mode = mode
        self.area = _check_range("random erasing area", (min_area, max_area))
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def draw_box(self, img_h: int, img_w: int, rng: random.Random) -> torch.Tensor:
        """→ int32 [4] (top, left, height, width) of the rectangle to erase; all zeros for none."""
        if rng.random() <= self.probability:
            for _ in range(10):
                target_area = rng.uniform(*self.area) * img_h * img_w
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    return torch.tensor([rng.randint(0, img_h - h), rng.randint(0, img_w - w), h, w],
                                        dtype=torch.int32)
        return torch.zeros(4, dtype=torch.int32)

    def erase(self, images: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Normalised images `[B, C, H, W]` and boxes `[B, 4]` on one device → the images with every box filled."""
        batch, channels, height, width = images.shape
        top, left, box_h, box_w = (boxes.to(images.device).long().T)[..., None, None]  # 4 × [B, 1, 1]
        rows = torch.arange(height, device=images.device)[None, :, None]  # [1, H, 1]
        cols = torch.arange(width, device=images.device)[None, None, :]  # [1, 1, W]
        inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)  # [B, H, W]
        if self.mode == "const":
            fill = torch.zeros((), dtype=images.dtype, device=images.device)
        else:
            noise_shape = (batch, channels, height, width) if self.mode == "pixel" else (batch, channels, 1, 1)
            fill = torch.randn(noise_shape, generator=generator, dtype=images.dtype, device=images.device)
        return torch.where(inside[:, None], fill, images)


class FinetuneTransform:
    """timm's training transform as BEiT fine-tuning builds it: RandomResizedCrop (bicubic) → horizontal flip →
    RandAugment (or, only when auto_augment is None/"", ColorJitter, as timm) → tensor → normalise →
    RandomErasing.

    `transform(img, rng)` → (uint8 [3, input_size, input_size], int32 [4] erasing box), what workers ship;
    `model_inputs` normalises and erases the batch on its device.
    """

    def __init__(self, input_size: int = 224, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, color_jitter: float = 0.4,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25, re_mode: str = "pixel",
                 mean: Sequence[float] = BEIT_DEFAULT_MEAN, std: Sequence[float] = BEIT_DEFAULT_STD,
                 interpolation: str = "bicubic"):
        self.input_size = _check_positive_int("input_size", input_size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.hflip = hflip
        self.mean, self.std = _check_mean_std(mean, std)
        self.interpolation = check_interpolation(interpolation)
        if auto_augment:
            fill = tuple(min(255, round(255 * m)) for m in self.mean)  # timm: geometric ops fill with the mean
            self.color_op = RandAugment(auto_augment, fill=fill, interpolation=interpolation)
        else:
            self.color_op = ColorJitter(color_jitter, color_jitter, color_jitter)
        self.random_erasing = RandomErasing(re_prob, re_mode) if re_prob > 0 else None

    def __call__(self, img: Image.Image | np.ndarray, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = resolve_rng(rng)
        pixels = as_hwc(img)
        box = random_resized_crop_box(pixels.shape[1], pixels.shape[0], self.scale, self.ratio, rng)
        view = resized_crop(pixels, box, self.input_size, self.interpolation)  # uint8 [3, S, S]
        if rng.random() < self.hflip:
            view = hflip(view)
        view = self._color(view, rng).contiguous()
        erase_box = self.random_erasing.draw_box(self.input_size, self.input_size, rng) \
            if self.random_erasing is not None else torch.zeros(4, dtype=torch.int32)
        return view, erase_box

    def _color(self, view: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """RandAugment (PIL ops) or colour jitter (on the crop: timm jitters after cropping) of a uint8 view."""
        pixels = view.permute(1, 2, 0).numpy()  # [S, S, 3], no copy for a channels-last view
        if isinstance(self.color_op, RandAugment):
            augmented = self.color_op(Image.fromarray(pixels, "RGB"), rng)
            return torch.from_numpy(np.array(augmented)).permute(2, 0, 1)
        params = self.color_op.params(self.color_op.draw(rng), pixels)
        return apply_color_jitter(view[None].float(), params[None])[0].to(torch.uint8)

    def model_inputs(self, images: torch.Tensor, erase_boxes: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """uint8 `[B, 3, S, S]` and boxes `[B, 4]` on the device → normalised, erased fp32 images."""
        images = normalize(to_unit_range(images), self.mean, self.std)
        return images if self.random_erasing is None else self.random_erasing.erase(images, erase_boxes, generator)


def default_crop_pct(input_size: int) -> float:
    """BEiT eval crop fraction: 224/256 below 384 pixels, 1.0 (no crop) at 384 and above."""
    return 224 / 256 if input_size < 384 else 1.0


class EvalTransform:
    """Resize the shorter side to floor(input_size / crop_pct) (bicubic) → centre crop input_size → normalise.

    Deterministic; takes (and ignores) an rng for a uniform transform interface. Unlike the official code, which
    squashes the image to a square at >= 384, a non-square image keeps its aspect ratio and is centre-cropped.
    `transform(img)` → uint8 [3, input_size, input_size]; `model_inputs` normalises a batch on its device.
    """

    def __init__(self, input_size: int = 224, crop_pct: float | None = None,
                 mean: Sequence[float] = BEIT_DEFAULT_MEAN, std: Sequence[float] = BEIT_DEFAULT_STD,
                 interpolation: str = "bicubic"):
        self.input_size = _check_positive_int("input_size", input_size)
        self.crop_pct = default_crop_pct(input_size) if crop_pct is None else crop_pct
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        self.resize_size = math.floor(input_size / self.crop_pct)
        self.mean, self.std = _check_mean_std(mean, std)
        self.interpolation = check_interpolation(interpolation)

    def __call__(self, img: Image.Image | np.ndarray, rng: random.Random | None = None) -> torch.Tensor:
        pixels = as_hwc(img)
        height, width = pixels.shape[:2]
        new_long = int(self.resize_size * max(width, height) / min(width, height))  # torchvision Resize(int)
        new_w, new_h = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
        resized = resize(pixels, new_w, new_h, self.interpolation)  # uint8 [3, new_h, new_w]
        top = int(round((new_h - self.input_size) / 2.0))
        left = int(round((new_w - self.input_size) / 2.0))
        return resized[:, top:top + self.input_size, left:left + self.input_size].contiguous()

    def model_inputs(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 `[B, 3, S, S]` on the device → normalised images in `dtype`."""
        return normalize(to_unit_range(images), self.mean, self.std).to(dtype)

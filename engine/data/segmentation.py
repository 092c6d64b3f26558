"""Semantic segmentation data in the ADE20K layout: the reader and mmseg's BEiT ADE20K pipelines (the CPU demo's
generated set: engine/data/demo_segmentation.py).

Layout (ADEChallengeData2016): `root/images/{training,validation}/<stem>.jpg` and
`root/annotations/{training,validation}/<stem>.png`, a single-channel 8-bit label map where 0 = "other"
(unlabelled) and 1..150 are the classes. `reduce_zero_label` (mmseg's ADE20K default) maps 0 → 255 (ignored) and
k → k - 1, so a model predicts classes 0..149 and the loss and metrics skip 255.

The pipelines follow the mmsegmentation 0.x configs of BEiT on ADE20K (upernet_beit, 512/640 crops):
train: Resize(img_scale × U(ratio_range), keep ratio) → RandomCrop(crop, cat_max_ratio 0.75) → RandomFlip(0.5)
→ PhotoMetricDistortion → Normalize → Pad(crop; image 0, label 255); test: Resize(img_scale, keep ratio) →
Normalize, with the logits upsampled to the ORIGINAL label size before scoring; multi-scale test: BEiT's
SETR_Resize under MultiScaleFlipAug, each ratio's size taken from the original image (`multi_scale_sizes`).
Evaluation therefore runs one image per batch (sizes differ from image to image), so no collate for variable
sizes exists here.

As in engine/data/transforms.py, workers ship uint8 tensors and `model_inputs` normalises a batch on its device;
every random draw comes from the `rng` (a random.Random) the caller passes, so (seed, epoch, index) fixes a sample.

Deliberate differences from mmcv, all small: resampling is PIL's (bilinear antialiases when it downscales, cv2's does
not; labels are always nearest); PhotoMetricDistortion's HSV steps run in float (mmcv quantises hue to 2° and
saturation to uint8 in between); the image is padded with the normalisation mean rounded to uint8, which
`model_inputs` maps to ≈ 0 (|x| < 0.01), because in mmseg Pad follows Normalize and pads the normalised image with 0.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.config import ConfigError
from engine.data.pixels import resample, saturation_hue
from engine.data.transforms import mean_std, normalize, resolve_rng, to_unit_range

SPLITS = ("training", "validation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255

_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ADE20K label mapping on a uint8 map: 0 (unlabelled) → 255 (ignored), k → k - 1, and 255 stays 255
    (mmseg: label[label == 0] = 255; label -= 1; label[label == 254] = 255). Returns a new array."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f"reduce_zero_label needs a uint8 label map, got {label.dtype}")
    out = label.copy()
    out[label == 0] = 255
    out -= 1  # no wrap-around: the zeros are 255 now
    out[out == 254] = 255
    return out


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as file:
            return file.convert("RGB")  # decodes now, so a truncated file fails here
    except _READ_ERRORS as err:
        raise ConfigError(f"{path}: cannot read the image ({type(err).__name__}: {err}); re-extract or remove "
                         f"it together with its annotation") from None


def _read_label(path: Path) -> np.ndarray:
    """A label map PNG → uint8 [H, W] of class indices (a "P" image gives its palette indices, not colours)."""
    try:
        with Image.open(path) as file:
            mode = file.mode
            pixels = np.array(file) if mode in ("L", "P") else None
    except _READ_ERRORS as err:
        raise ConfigError(f"{path}: cannot read the label map ({type(err).__name__}: {err}); re-extract it") from None
    if pixels is None:
        raise ConfigError(f"{path}: label map has mode {mode!r}; expected a single-channel 8-bit PNG (mode L or P)")
    return pixels


def _files_by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if entry.is_file() and not entry.name.startswith(".") and ext.lower() in extensions:
            if stem in found:
                raise ConfigError(f"{entry.path}: another file has the same stem {stem!r} ({found[stem]}); keep one")
            found[stem] = Path(entry.path)
    return found


class ADE20KDataset:
    """Image / label-map pairs of one split of an ADE20K-format folder.

    Args:
        root: the folder holding `images/` and `annotations/` (ADEChallengeData2016).
        split: "training" or "validation".
        reduce_zero_label: apply `reduce_zero_label` on load (mmseg's ADE20K default: 0 is "other", ignored).
        num_classes: when given, every label value (after the mapping) must be in [0, num_classes) or 255;
            checked on load with np.unique, so a wrong class count fails on the first bad map, not in the loss.

    `dataset[i]` → (RGB PIL image, mode "L" PIL label map of uint8 class indices, same size). `files` lists the
    (image, annotation) paths, sorted by file stem. Every problem raises a ValueError naming the file and the fix:
    the folders and the pairing are checked here, sizes and label values when a sample is loaded. Problems with the
    files raise `ConfigError` (a ValueError that recipes print as one line), bad arguments a plain ValueError.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", reduce_zero_label: bool = True,
                 num_classes: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_classes is not None and not 0 < num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255] (255 is the ignore index), got {num_classes}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"ADE20K root not found: {self.root}; point it at the folder holding images/ and "
                             f"annotations/ (e.g. ADEChallengeData2016)")
        self.split = split
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = num_classes
        self.image_dir = self.root / "images" / split
        self.annotation_dir = self.root / "annotations" / split
        for folder in (self.image_dir, self.annotation_dir):
            if not folder.is_dir():
                raise ConfigError(f"{folder}: split folder missing; an ADE20K root holds images/{split}/ and "
                                 f"annotations/{split}/")
        images = _files_by_stem(self.image_dir, IMAGE_EXTENSIONS)
        if not images:
            raise ConfigError(f"{self.image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); add the split's images")
        annotations = _files_by_stem(self.annotation_dir, (".png",))
        unlabelled = sorted(images.keys() - annotations.keys())
        if unlabelled:
            raise ConfigError(f"{images[unlabelled[0]]}: no annotation {self.annotation_dir / unlabelled[0]}.png "
                             f"({len(unlabelled)} image(s) lack one); add the label maps or remove the images")
        orphans = sorted(annotations.keys() - images.keys())
        if orphans:
            raise ConfigError(f"{annotations[orphans[0]]}: annotation without an image in {self.image_dir} "
                             f"({len(orphans)} such); add the images or remove the annotations")
        self.files = [(images[stem], annotations[stem]) for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
        image_path, label_path = self.files[index]
        image = read_image(image_path)
        label = _read_label(label_path)  # [H, W] uint8
        if label.shape != (image.height, image.width):
            raise ConfigError(f"{label_path}: label map is {label.shape[1]}x{label.shape[0]} but its image "
                             f"{image_path} is {image.width}x{image.height}; the pair must have the same size")
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        if self.num_classes is not None:
            values = np.unique(label)
            bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
            if bad.size:
                stored = int(bad[0]) + 1 if self.reduce_zero_label else int(bad[0])
                raise ConfigError(f"{label_path}: label value {int(bad[0])} (stored as {stored}) is outside "
                                 f"[0, {self.num_classes}) and not the ignore index {IGNORE_INDEX}; check "
                                 f"num_classes and reduce_zero_label={self.reduce_zero_label}")
        return image, Image.fromarray(label, "L")


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv.rescale_size for a (long, short) bound: the largest factor with long side <= max(scale) and short side
    <= min(scale) (up or down) → (new_width, new_height), rounded half up as mmcv."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def multi_scale_sizes(width: int, height: int, img_scale: Sequence[int], crop_size: int,
                      ratios: Sequence[float]) -> list[tuple[int, int]]:
    """The official multi-scale test's sizes `[(new_width, new_height)]`, one per ratio r: BEiT's
    `SETR_Resize(setr_multi_scale=True)` under `MultiScaleFlipAug(img_ratios)` resizes the ORIGINAL image, aspect
    kept, to the short side max(crop_size, int(min(img_scale) · r)): ratios below 1 run at the crop size, not
    smaller (at 512: 0.5, 0.75, 1.0 → 512; 1.25 → 640; 1.5 → 768; 1.75 → 896), and no long-side bound applies."""
    sizes = []
    for ratio in ratios:
        short = max(crop_size, int(min(img_scale) * ratio))
        long = short * max(width, height) / min(width, height)  # SETR_Resize's (new_h, new_w), then imrescale
        sizes.append(rescale_size(width, height, (long, short)))
    return sizes


def _as_pair(img: Image.Image, label: Image.Image | np.ndarray) -> tuple[Image.Image, Image.Image]:
    """→ (RGB image, mode "L" label map of class indices: a "P" map gives its indices, an array must be uint8
    [H, W]), checked to have the same size."""
    if isinstance(label, Image.Image) and label.mode not in ("L", "P"):
        raise ValueError(f"label map must have mode L or P, got {label.mode!r}")
    if not isinstance(label, Image.Image) or label.mode == "P":
        label = np.asarray(label)
        if label.dtype != np.uint8 or label.ndim != 2:
            raise ValueError(f"label map must be uint8 [H, W], got {label.dtype} {label.shape}")
        label = Image.fromarray(label, "L")
    if img.size != label.size:
        raise ValueError(f"image is {img.width}x{img.height} but its label map is {label.width}x{label.height}")
    return img.convert("RGB"), label


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on uint8 RGB [H, W, 3]: brightness (+U(-32, 32)), then contrast (×U(0.5, 1.5))
    either before or after saturation (×U(0.5, 1.5) on HSV's S) and hue (+randrange(-18, 18) OpenCV hue units of 2°);
    each applied with probability 0.5, clipped and truncated to uint8 in between as mmseg does. Contrast is a plain
    multiplication, as in mmseg (not a blend towards the mean)."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(pixels: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(pixels.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, pixels: np.ndarray, rng: random.Random) -> np.ndarray:
        return self._convert(pixels, alpha=rng.uniform(*self.contrast_range)) if rng.randrange(2) else pixels

    def __call__(self, pixels: np.ndarray, rng: random.Random | None = None) -> np.ndarray:
        rng = resolve_rng(rng)
        if rng.randrange(2):
            pixels = self._convert(pixels, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.randrange(2) == 1  # mmseg's `mode`
        if contrast_first:
            pixels = self._contrast(pixels, rng)
        # Draws in mmseg's order (saturation, then hue); both edits share one float HSV round trip.
        saturation = rng.uniform(*self.saturation_range) if rng.randrange(2) else None
        hue_shift = rng.randrange(-self.hue_delta, self.hue_delta) if rng.randrange(2) else None  # numpy randint
        if saturation is not None or hue_shift is not None:
            pixels = saturation_hue(pixels, saturation, hue_shift)
        if not contrast_first:
            pixels = self._contrast(pixels, rng)
        return pixels


class _SegTransform:
    def __init__(self, img_scale: Sequence[int], imagenet_mean_std: bool):
        if len(img_scale) != 2 or min(img_scale) < 1:
            raise ValueError(f"img_scale must be (long, short) positive sizes, e.g. (2048, 512), got {img_scale!r}")
        self.img_scale = (int(img_scale[0]), int(img_scale[1]))
        self.mean, self.std = mean_std(imagenet_mean_std)
        # The uint8 colour that normalises to ≈ 0: mmseg pads after Normalize, with 0.
        self.pad_color = np.array([round(255 * m) for m in self.mean], dtype=np.uint8)

    def model_inputs(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 `[B, 3, H, W]` on the device → normalised images in `dtype`."""
        return normalize(to_unit_range(images), self.mean, self.std).to(dtype)


class SegTrainTransform(_SegTransform):
    """mmseg's BEiT ADE20K training pipeline (see the module docstring) on an (image, label map) pair.

    Args:
        crop_size: side of the square crop every sample is padded to.
        img_scale: (long, short) bound of the resize before the random ratio; the demo uses e.g. (224, 56).
        ratio_range: the bound is multiplied by U(low, high) (None: no random ratio).
        cat_max_ratio: up to 10 re-draws of the crop until no class covers >= this fraction of its labelled
            (non-ignored) pixels and there are at least 2 classes; the last draw is kept otherwise (mmseg).
        flip_prob: horizontal flip probability. photometric: apply PhotoMetricDistortion.
        ignore_index: the label never counted by cat_max_ratio, and the label of padding.
        imagenet_mean_std: ImageNet mean/std (mmseg's BEiT configs) or BEiT's 0.5/0.5, for `model_inputs`.

    `transform(img, label, rng)` → (image uint8 [3, crop, crop], label uint8 [crop, crop]); the rng draws, in
    order: the ratio, the crop(s), the flip, then the photometric distortion (last, so it never moves labels).
    """

    def __init__(self, crop_size: int, img_scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] | None = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, ignore_index: int = IGNORE_INDEX,
                 imagenet_mean_std: bool = True):
        super().__init__(img_scale, imagenet_mean_std)
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        if ratio_range is not None and (len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, or None; got {ratio_range!r}")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must fit a uint8 label map, got {ignore_index}")
        self.crop_size = crop_size
        self.ratio_range = None if ratio_range is None else (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.ignore_index = ignore_index

    def _scale(self, rng: random.Random) -> tuple[int, int]:
        if self.ratio_range is None:
            return self.img_scale
        low, high = self.ratio_range
        ratio = rng.random() * (high - low) + low  # mmseg's random_sample_ratio
        return int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio)

    def crop_origin(self, labels: np.ndarray, rng: random.Random) -> tuple[int, int]:
        """mmseg RandomCrop's (top, left) on a label map uint8 [H, W], with the cat_max_ratio retries."""
        height, width = labels.shape
        size = self.crop_size

        def draw() -> tuple[int, int]:
            return rng.randint(0, max(height - size, 0)), rng.randint(0, max(width - size, 0))

        top, left = draw()
        if self.cat_max_ratio < 1:
            for _ in range(10):
                counts = np.bincount(labels[top:top + size, left:left + size].ravel(), minlength=256)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                    break
                top, left = draw()
        return top, left

    def __call__(self, img: Image.Image, label: Image.Image | np.ndarray, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = resolve_rng(rng)
        img, label = _as_pair(img, label)
        size = rescale_size(img.width, img.height, self._scale(rng))  # image bilinear, labels always nearest
        pixels = resample(np.asarray(img), *size, "bilinear")  # [h, w, 3] uint8, PIL's pixels (natively)
        labels = np.asarray(label.resize(size, Image.Resampling.NEAREST))  # [h, w] uint8
        top, left = self.crop_origin(labels, rng)
        size = self.crop_size
        pixels, labels = pixels[top:top + size, left:left + size], labels[top:top + size, left:left + size]
        if rng.random() < self.flip_prob:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        if self.photometric is not None:
            pixels = self.photometric(pixels, rng)
        # Pad bottom / right to the crop (mmseg's Pad(size_divisor=None, size=crop)).
        height, width = labels.shape
        padded = np.empty((size, size, 3), dtype=np.uint8)
        padded[...] = self.pad_color
        padded[:height, :width] = pixels
        padded_labels = np.full((size, size), self.ignore_index, dtype=np.uint8)
        padded_labels[:height, :width] = labels
        return torch.from_numpy(padded).permute(2, 0, 1).contiguous(), torch.from_numpy(padded_labels)


class SegEvalTransform(_SegTransform):
    """mmseg's test pipelines → uint8 tensors: single-scale (`scales` (1.0,)) Resize(img_scale, keep ratio);
    multi-scale the original image, which `sizes` then gives the official sizes to infer at.

    `transform(img, label)` → (image uint8 [3, h, w], label uint8 [H0, W0] at the ORIGINAL size): the official
    evaluation upsamples the logits (bilinear) to the original label size before the argmax. Sizes vary, so evaluate
    one image per batch. Deterministic; takes (and ignores) an rng for a uniform interface.
    """

    def __init__(self, img_scale: Sequence[int] = (2048, 512), imagenet_mean_std: bool = True,
                 scales: Sequence[float] = (1.0,), crop_size: int | None = None):
        super().__init__(img_scale, imagenet_mean_std)
        self.scales = tuple(float(s) for s in scales)
        self.multi_scale = self.scales != (1.0,)
        if self.multi_scale and crop_size is None:
            raise ValueError("a multi-scale test needs the crop size (no ratio's short side falls below it)")
        self.crop_size = crop_size

    def __call__(self, img: Image.Image, label: Image.Image | np.ndarray, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = _as_pair(img, label)
        if not self.multi_scale:
            img = img.resize(rescale_size(img.width, img.height, self.img_scale), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return pixels, torch.from_numpy(np.array(label, dtype=np.uint8))

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The `(h, w)` sizes to infer an image of this transform's output at: its own single-scale, else one per
        scale (`multi_scale_sizes` of the original image)."""
        if not self.multi_scale:
            return [(height, width)]
        return [(h, w) for w, h in multi_scale_sizes(width, height, self.img_scale, self.crop_size, self.scales)]

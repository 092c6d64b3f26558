"""Pixels in the workers: decode a file to an RGB array, resample a crop box of it, flip.

Why not PIL images end to end: on one core of the development machine (`benchmarks/bench_data.py --stages=true`)
a PIL round trip (`Image.fromarray` then `np.asarray`) of an ImageNet-sized image costs ~0.3 ms and PIL's bicubic
resize of a crop box to 224 ~1.6 ms, of a ~4 ms budget per image at the feed rate one GPU needs. So images travel as
`[H, W, 3]` uint8 arrays:
- JPEGs decode with simplejpeg (libjpeg-turbo; pixels identical to PIL's decode, ~2.5x faster to an array); other
  formats, and
  CMYK/YCCK JPEGs, with PIL.
- Bilinear and bicubic resampling use torch's antialiased uint8 kernel on a channels-last view of the array (PIL's
  filters: within 0.1 grey level on average of PIL's result, ~0.45 ms, ~3.6x faster); lanczos and nearest, which torch
  lacks,
  use PIL on the crop only.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the input image

_JPEG_MAGIC = b"\xff\xd8"
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}
_PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def check_interpolation(name: str) -> str:
    if name not in _PIL_FILTERS:
        raise ValueError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {name!r}")
    return name


def pil_filter(name: str) -> Image.Resampling:
    return _PIL_FILTERS[check_interpolation(name)]


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` → RGB uint8 `[H, W, 3]` (see `decode_bytes`)."""
    with open(path, "rb") as file:
        return decode_bytes(file.read())


def decode_bytes(data: bytes) -> np.ndarray:
    """An encoded image (a file's bytes) → RGB uint8 `[H, W, 3]`. Raises OSError/ValueError (PIL's or simplejpeg's)
    when it cannot be decoded, as PIL would."""
    if data[:2] == _JPEG_MAGIC:
        import simplejpeg

        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
        except ValueError:
            colorspace = None  # let PIL name the problem
        if colorspace in ("YCbCr", "Gray", "RGB"):  # libjpeg converts these to RGB as PIL does
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with Image.open(io.BytesIO(data)) as image:
        return as_hwc(image)


def encoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image from its header (no decode); raises as `decode_bytes` when it is not
    an image."""
    if data[:2] == _JPEG_MAGIC:
        import simplejpeg

        try:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            return width, height
        except ValueError:
            pass  # let PIL name the problem
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def as_hwc(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB PIL image or uint8 array → uint8 `[H, W, 3]` (arrays pass through; grey `[H, W]` is repeated)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 3 and image.shape[2] == 3 or image.ndim == 2):
            raise ValueError(f"expected a uint8 [H, W, 3] or [H, W] image array, got {image.dtype} {image.shape}")
        return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
    return np.asarray(image.convert("RGB"))


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height), PIL's order."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def chw_view(pixels: np.ndarray) -> torch.Tensor:
    """uint8 `[H, W, 3]` array → uint8 `[3, H, W]` tensor sharing its memory (channels-last strides)."""
    if not pixels.flags.writeable:  # torch.from_numpy warns on read-only arrays; copy those (small, rare)
        pixels = pixels.copy()
    return torch.from_numpy(pixels).permute(2, 0, 1)


def resized_crop(pixels: np.ndarray, box: Box, size: int, interpolation: str) -> torch.Tensor:
    """The `box` of uint8 `[H, W, 3]` pixels resampled to `size` x `size` → uint8 `[3, size, size]` with
    channels-last strides (a view of an `[size, size, 3]` buffer: `.permute(1, 2, 0).numpy()` is free, `.contiguous()`
    makes the layout workers ship).

    Antialiased when shrinking, as PIL. The filter sees only the box (PIL also reads pixels just outside it, which
    moves edge pixels slightly)."""
    top, left, height, width = box
    crop = pixels[top:top + height, left:left + width]
    if interpolation in _TORCH_MODES:
        if (height, width) == (size, size):
            return chw_view(np.ascontiguousarray(crop))
        return F.interpolate(chw_view(crop)[None], size=(size, size), mode=_TORCH_MODES[interpolation],
                             antialias=True, align_corners=False)[0]
    image = Image.fromarray(np.ascontiguousarray(crop), "RGB").resize((size, size), pil_filter(interpolation))
    return chw_view(np.array(image))


def resize(pixels: np.ndarray, width: int, height: int, interpolation: str) -> torch.Tensor:
    """Whole uint8 `[H, W, 3]` pixels resampled to `width` x `height` → uint8 `[3, height, width]` (channels-last)."""
    if interpolation in _TORCH_MODES:
        return F.interpolate(chw_view(pixels)[None], size=(height, width), mode=_TORCH_MODES[interpolation],
                             antialias=True, align_corners=False)[0]
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB").resize((width, height), pil_filter(interpolation))
    return chw_view(np.array(image))


def hflip(view: torch.Tensor) -> torch.Tensor:
    """`[..., W]` mirrored left-right (a copy)."""
    return view.flip(-1)

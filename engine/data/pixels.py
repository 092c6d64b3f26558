"""Pixels in the workers: decode a file to an RGB array, resample a crop box of it, flip.

Why not PIL images end to end: on one core of the development machine (`benchmarks/bench_data.py --stages=true`)
a PIL round trip (`Image.fromarray` then `np.asarray`) of an ImageNet-sized image costs 0.3-0.65 ms and PIL's
resampling of a crop box to 224 (bicubic) or 112 (Lanczos) 1.4-1.8 ms, of a ~4 ms budget per image at the feed rate
one GPU needs. So images travel as `[H, W, 3]` uint8 arrays:
- JPEGs decode with simplejpeg (libjpeg-turbo; pixels identical to PIL's decode, 2.2-2.7x faster to an array); other
  formats, and CMYK/YCCK JPEGs, with PIL.
- Bilinear, bicubic and Lanczos resampling run in the native extension `engine.data._native_pixels`
  (csrc/pixels.cpp): PIL's filters and fixed-point arithmetic, so PIL's pixels bit for bit, several times faster
  (vector loops over whole lines instead of PIL's per-pixel loops). Without the extension PIL itself resamples (the
  same pixels, slower). Nearest uses PIL.
- Both passes run horizontal first, the order of every Pillow before 13 (the official code's); Pillow 13 runs the
  vertical pass first when the height shrinks much more than the width (python-pillow/Pillow#9549), which moves a
  few pixels by one grey level, so the PIL path runs the two passes as two single-axis resizes.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the input image

try:
    from engine.data import _native_pixels
except ImportError:  # not built (no CMake or compiler at install): PIL resamples, to the same pixels
    _native_pixels = None

_JPEG_MAGIC = b"\xff\xd8"
_NATIVE_FILTERS = ("bilinear", "bicubic", "lanczos")
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


def resampler() -> str:
    """What resamples bilinear/bicubic/lanczos in this process: 'native' or 'PIL' (the same pixels)."""
    return "native" if _native_pixels is not None else "PIL"


def resample(pixels: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """uint8 `[H, W, 3]` pixels (a crop view is fine) resampled to uint8 `[height, width, 3]` as PIL's
    `Image.resize((width, height), filter)` does, horizontal pass first (see the module docstring). Antialiased when
    shrinking, as PIL."""
    check_interpolation(interpolation)
    if pixels.shape[:2] == (height, width):
        return np.ascontiguousarray(pixels)
    if interpolation in _NATIVE_FILTERS and _native_pixels is not None:
        return _native_pixels.resample(pixels, width, height, interpolation)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    if interpolation not in _NATIVE_FILTERS:
        return np.asarray(image.resize((width, height), pil_filter(interpolation)))
    if width != image.width:
        image = image.resize((width, image.height), pil_filter(interpolation))
    if height != image.height:
        image = image.resize((width, height), pil_filter(interpolation))
    return np.asarray(image)


def resized_crop(pixels: np.ndarray, box: Box, size: int, interpolation: str) -> torch.Tensor:
    """The `box` of uint8 `[H, W, 3]` pixels resampled to `size` x `size` → uint8 `[3, size, size]` with
    channels-last strides (a view of an `[size, size, 3]` buffer: `.permute(1, 2, 0).numpy()` is free, `.contiguous()`
    makes the layout workers ship). The filter sees only the box, as torchvision's crop-then-resize."""
    top, left, height, width = box
    return chw_view(resample(pixels[top:top + height, left:left + width], size, size, interpolation))


def resize(pixels: np.ndarray, width: int, height: int, interpolation: str) -> torch.Tensor:
    """Whole uint8 `[H, W, 3]` pixels resampled to `width` x `height` → uint8 `[3, height, width]` (channels-last)."""
    return chw_view(resample(pixels, width, height, interpolation))


def affine(pixels: np.ndarray, coefficients: tuple[float, ...], interpolation: str,
           fill: tuple[int, int, int]) -> np.ndarray:
    """uint8 `[H, W, 3]` pixels through an affine map → uint8 `[H, W, 3]`: PIL's
    `Image.transform(size, AFFINE, coefficients, resample, fillcolor=fill)` (coefficients a0..a5 map output to input
    pixel centres), the same pixels natively for bilinear and bicubic (~2.4x faster than PIL's), PIL otherwise."""
    if interpolation in ("bilinear", "bicubic") and _native_pixels is not None:
        return _native_pixels.affine(pixels, [float(c) for c in coefficients], interpolation, list(fill))
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    return np.asarray(image.transform(image.size, Image.Transform.AFFINE, tuple(coefficients),
                                      resample=pil_filter(interpolation), fillcolor=tuple(fill)))


def rotation_coefficients(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """The affine map of PIL's `Image.rotate(degrees)` about the image centre (no expand, no translation), computed
    as PIL computes it (cosines rounded to 15 digits), so `affine(...)` with it gives `rotate`'s pixels."""
    angle = -math.radians(degrees % 360.0)
    a, b, d, e = (round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15),
                  round(math.cos(angle), 15))
    center_x, center_y = width / 2, height / 2
    c = a * -center_x + b * -center_y + 0.0 + center_x
    f = d * -center_x + e * -center_y + 0.0 + center_y
    return a, b, c, d, e, f


def saturation_hue(pixels: np.ndarray, saturation: float | None, hue_shift: int | None) -> np.ndarray:
    """uint8 `[H, W, 3]` RGB with the HSV saturation scaled by `saturation` (clipped to [0, 1]) and the hue shifted
    by `hue_shift` OpenCV units (2 degrees), None skipping either: segmentation's photometric distortion. Natively
    when built, else `saturation_hue_reference`: the same bytes."""
    if _native_pixels is not None:
        return _native_pixels.saturation_hue(pixels, saturation, hue_shift)
    return saturation_hue_reference(pixels, saturation, hue_shift)


def saturation_hue_reference(pixels: np.ndarray, saturation: float | None, hue_shift: int | None) -> np.ndarray:
    """numpy's float32 HSV round trip that `saturation_hue` computes (the reference of the native path)."""
    hue, sat, value = _rgb_to_hsv(pixels.astype(np.float32))
    if saturation is not None:
        sat = np.clip(sat * saturation, 0, 1)
    if hue_shift is not None:
        hue = (hue + hue_shift / 30) % 6  # 1 OpenCV unit = 2 degrees, a sextant = 60 degrees
    return np.clip(np.rint(_hsv_to_rgb(hue, sat, value)), 0, 255).astype(np.uint8)


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """hue in sextants [0, 6), saturation [0, 1], value [0, 255] → float RGB [..., 3] (f(n) = v - v s max(0,
    min(k, 4 - k, 1)), k = (n + h) mod 6, n = 5, 3, 1 for R, G, B)."""
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + hue[..., None]) % 6
    return value[..., None] * (1 - saturation[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def _rgb_to_hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float RGB [..., 3] in [0, 255] → (hue in sextants [0, 6), saturation [0, 1], value [0, 255])."""
    red, green, blue = np.moveaxis(pixels, -1, 0)
    value = pixels.max(-1)
    chroma = value - pixels.min(-1)
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(value == red, ((green - blue) / safe) % 6,
                   np.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4))
    return np.where(chroma > 0, hue, 0), np.where(value > 0, chroma / np.maximum(value, 1), 0), value


def hflip(view: torch.Tensor) -> torch.Tensor:
    """`[..., W]` mirrored left-right (a copy)."""
    return view.flip(-1)

"""RandAugment with timm's op set, magnitude semantics and config strings (e.g. BEiT's "rand-m9-mstd0.5-inc1").

Config string: "rand" then dash-separated sections, each a key followed by its value:
- `m<int>`: magnitude, 0..10 (default 10); `n<int>`: ops applied per image (default 2);
- `mstd<float>`: std of a Gaussian noise added to the magnitude per op call (> 100 → uniform in [0, m]);
- `mmax<int>`: upper clip of the magnitude (default 10); `inc<0|1>`: use the "increasing" op variants, whose
  strength grows with the magnitude (posterize keeps fewer bits, solarize a lower threshold, enhance ops move
  further from 1 in a random direction).

Each chosen op runs with probability 0.5. Ops are drawn with replacement. Geometric ops (rotate, shear, translate)
fill with the dataset mean colour and resample with the given interpolation; they run through
`engine.data.pixels.affine` (PIL's pixels, natively: PIL's bicubic affine transform costs ~3 ms on a 224 view).

Randomness comes only from the `random.Random` passed to `__call__`, so a seeded generator reproduces the output.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from engine.data.pixels import affine, rotation_coefficients

_LEVEL_DENOM = 10.0  # magnitude m maps to the fraction m / 10 of each op's range
_OP_PROBABILITY = 0.5
_TRANSLATE_PCT = 0.45  # largest translation, as a fraction of the image side
_SOLARIZE_ADD_THRESHOLD = 128


@dataclass(frozen=True)
class _Geometry:
    fill: tuple[int, int, int]  # RGB fill of areas uncovered by a geometric op
    interpolation: str  # nearest | bilinear | bicubic (what PIL's rotate accepts)


def _negate_half(value: float, rng: random.Random) -> float:
    """`value` with a random sign (the sign draw follows timm: negative when U(0,1) > 0.5)."""
    return -value if rng.random() > 0.5 else value


def _affine(img: Image.Image, coefficients: tuple[float, ...], geometry: _Geometry) -> Image.Image:
    """PIL's `img.transform(img.size, AFFINE, coefficients, resample, fillcolor=fill)`."""
    return Image.fromarray(affine(np.asarray(img), coefficients, geometry.interpolation, geometry.fill))


# Each op: (RGB image, level = magnitude clipped to [0, mmax], rng for its sign draw, geometry) → RGB image.
def _auto_contrast(img, level, rng, geometry):
    return ImageOps.autocontrast(img)


def _equalize(img, level, rng, geometry):
    return ImageOps.equalize(img)


def _invert(img, level, rng, geometry):
    return ImageOps.invert(img)


def _rotate(img, level, rng, geometry):
    degrees = _negate_half(level / _LEVEL_DENOM * 30.0, rng)  # [-30, 30]
    if degrees % 360.0 == 0:  # PIL's rotate copies (its other shortcuts, 90/180/270 degrees, are out of range)
        return img.copy()
    return _affine(img, rotation_coefficients(degrees, *img.size), geometry)


def _shear_x(img, level, rng, geometry):
    factor = _negate_half(level / _LEVEL_DENOM * 0.3, rng)  # [-0.3, 0.3]
    return _affine(img, (1, factor, 0, 0, 1, 0), geometry)


def _shear_y(img, level, rng, geometry):
    factor = _negate_half(level / _LEVEL_DENOM * 0.3, rng)
    return _affine(img, (1, 0, 0, factor, 1, 0), geometry)


def _translate_x_rel(img, level, rng, geometry):
    pixels = _negate_half(level / _LEVEL_DENOM * _TRANSLATE_PCT, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0), geometry)


def _translate_y_rel(img, level, rng, geometry):
    pixels = _negate_half(level / _LEVEL_DENOM * _TRANSLATE_PCT, rng) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels), geometry)


def _posterize_bits(img: Image.Image, bits: int) -> Image.Image:
    """Keeps the `bits` (0..8) high bits of each channel; 0 bits gives black, as old Pillow's posterize did (new
    Pillow rejects 0, which RandAugment reaches at the strong end)."""
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _posterize(img, level, rng, geometry):
    return _posterize_bits(img, int(level / _LEVEL_DENOM * 4))  # keeps 0..4 bits: weaker as level grows


def _posterize_increasing(img, level, rng, geometry):
    return _posterize_bits(img, 4 - int(level / _LEVEL_DENOM * 4))  # keeps 4..0 bits: stronger as level grows


def _solarize(img, level, rng, geometry):
    return ImageOps.solarize(img, int(level / _LEVEL_DENOM * 256))  # threshold 0..256: weaker as level grows


def _solarize_increasing(img, level, rng, geometry):
    return ImageOps.solarize(img, 256 - int(level / _LEVEL_DENOM * 256))


def _solarize_add(img, level, rng, geometry):
    add = int(level / _LEVEL_DENOM * 110)  # [0, 110] added to pixels below the threshold, clipped at 255
    lut = [min(255, i + add) if i < _SOLARIZE_ADD_THRESHOLD else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(enhancer, img, level, rng, geometry):
    return enhancer(img).enhance(level / _LEVEL_DENOM * 1.8 + 0.1)  # factor [0.1, 1.9]


def _enhance_increasing(enhancer, img, level, rng, geometry):
    # 1.0 leaves the image unchanged; the factor moves away from 1 (either way) as the level grows, floor 0.1
    return enhancer(img).enhance(max(0.1, 1.0 + _negate_half(level / _LEVEL_DENOM * 0.9, rng)))


Op = Callable[[Image.Image, float, random.Random, _Geometry], Image.Image]
OPS: dict[str, Op] = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize_increasing,
    "Solarize": _solarize,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "Color": functools.partial(_enhance, ImageEnhance.Color),
    "ColorIncreasing": functools.partial(_enhance_increasing, ImageEnhance.Color),
    "Contrast": functools.partial(_enhance, ImageEnhance.Contrast),
    "ContrastIncreasing": functools.partial(_enhance_increasing, ImageEnhance.Contrast),
    "Brightness": functools.partial(_enhance, ImageEnhance.Brightness),
    "BrightnessIncreasing": functools.partial(_enhance_increasing, ImageEnhance.Brightness),
    "Sharpness": functools.partial(_enhance, ImageEnhance.Sharpness),
    "SharpnessIncreasing": functools.partial(_enhance_increasing, ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _parse_magnitude_std(value: str) -> float:
    std = float(value)
    return math.inf if std > 100 else std  # timm: a std above 100 means "uniform in [0, magnitude]"


# config-string key → (RandAugmentConfig field, parser of the value text)
_SECTION_PARSERS: dict[str, tuple[str, Callable[[str], float | int | bool]]] = {
    "m": ("magnitude", int),
    "n": ("num_layers", int),
    "mstd": ("magnitude_std", _parse_magnitude_std),
    "mmax": ("magnitude_max", int),
    "inc": ("increasing", lambda value: bool(int(value))),
}


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed RandAugment config string (see the module docstring)."""

    magnitude: float = _LEVEL_DENOM
    num_layers: int = 2
    magnitude_std: float = 0.0  # inf → uniform in [0, magnitude]
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False

    @classmethod
    def parse(cls, config_str: str) -> RandAugmentConfig:
        sections = config_str.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand', got {config_str!r} (e.g. "
                             f"'rand-m9-mstd0.5-inc1')")
        values: dict[str, float | int | bool] = {}
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", section)
            if match is None:
                raise ValueError(f"RandAugment section {section!r} in {config_str!r} is not a key followed by a number")
            key, value = match.groups()
            if key not in _SECTION_PARSERS:
                raise ValueError(f"unknown RandAugment section {section!r} in {config_str!r}; known keys: "
                                 f"{', '.join(_SECTION_PARSERS)}")
            field, convert = _SECTION_PARSERS[key]
            try:
                values[field] = convert(value)
            except ValueError:
                raise ValueError(f"RandAugment section {section!r} in {config_str!r}: bad value {value!r}") from None
        config = cls(**values)
        if config.num_layers < 0 or config.magnitude_std < 0:
            raise ValueError(f"RandAugment {config_str!r}: n and mstd must be >= 0")
        return config


class RandAugment:
    """Applies `num_layers` ops drawn with replacement from the timm op set, each with probability 0.5.

    Args:
        config: a config string ("rand-m9-mstd0.5-inc1") or a parsed `RandAugmentConfig`.
        fill: RGB fill colour of geometric ops (timm: the dataset mean, `round(255 * mean)`).
        interpolation: resampling of geometric ops ("bicubic" in BEiT; nearest/bilinear/bicubic).
    """

    def __init__(self, config: str | RandAugmentConfig, fill: tuple[int, int, int] = (128, 128, 128),
                 interpolation: str = "bicubic"):
        self.config = RandAugmentConfig.parse(config) if isinstance(config, str) else config
        self.op_names = RAND_INCREASING_OPS if self.config.increasing else RAND_OPS
        if interpolation not in ("nearest", "bilinear", "bicubic"):  # PIL's rotate supports only these three
            raise ValueError(f"RandAugment interpolation must be one of ['bicubic', 'bilinear', 'nearest'], got "
                             f"{interpolation!r}")
        self.geometry = _Geometry(tuple(int(c) for c in fill), interpolation)

    def _magnitude(self, rng: random.Random) -> float:
        magnitude = self.config.magnitude
        if self.config.magnitude_std == math.inf:
            magnitude = rng.uniform(0, magnitude)
        elif self.config.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, self.config.magnitude_std)
        return max(0.0, min(magnitude, self.config.magnitude_max))

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """RGB image → augmented RGB image of the same size."""
        for name in rng.choices(self.op_names, k=self.config.num_layers):
            if rng.random() > _OP_PROBABILITY:
                continue
            img = OPS[name](img, self._magnitude(rng), rng, self.geometry)
        return img

    def __repr__(self) -> str:
        return f"RandAugment({self.config}, ops={list(self.op_names)})"

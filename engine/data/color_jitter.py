"""Colour jitter (torchvision ColorJitter without hue, on PIL's arithmetic), drawn in the worker, applied in batch.

torchvision's ColorJitter on a PIL image applies brightness, contrast and saturation in a random order, each with a
factor drawn in [max(0, 1 - s), 1 + s], through PIL's ImageEnhance: `blend(degenerate, image, factor)` with degenerate
black (brightness), the grey mean of the whole image (contrast) or the image in grey (saturation), each result
truncated to uint8. `apply_color_jitter` is that arithmetic on float tensors (PIL's float32 blend, its grey
conversion, truncation after each op), for a batch whose samples each have their own order and factors, on any
device. The one statistic that needs the whole image, the contrast op's grey mean, is computed in the worker
(`ColorJitter.params`) from a subsample of the image with the ops that precede contrast applied.

BEiT pretraining jitters the whole image, then crops and resamples; here the two views are resampled first and
jittered after, on the device: the ops are per-pixel affine maps, which commute with resampling up to rounding and
clipping (tests/test_data_pipeline_distribution.py bounds the difference).

Params of one sample, float32 `[7]`: the op ids in application order (BRIGHTNESS, CONTRAST, SATURATION; NO_OP pads),
their factors, and the contrast op's grey mean (0 when it has none).
"""

from __future__ import annotations

import random

import numpy as np
import torch

BRIGHTNESS, CONTRAST, SATURATION, NO_OP = 0, 1, 2, -1
NUM_PARAMS = 7
# PIL's RGB → L conversion, fixed point: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16
_GREY_WEIGHTS = (19595.0, 38470.0, 7471.0)
_MEAN_SAMPLES = 1 << 12  # pixels the grey mean reads: a strided ~64 x 64 grid (every pixel of a small image)


def grey(images: torch.Tensor) -> torch.Tensor:
    """PIL's luminance of integer-valued float images `[..., 3, H, W]` → `[..., 1, H, W]` (exact in float32)."""
    red, green, blue = images.unbind(-3)
    weighted = red * _GREY_WEIGHTS[0] + green * _GREY_WEIGHTS[1] + blue * _GREY_WEIGHTS[2] + 32768.0
    return torch.floor(weighted / 65536.0).unsqueeze(-3)


def apply_color_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Integer-valued float images `[B, 3, H, W]` (0..255) and params `[B, 7]` → jittered float images, 0..255."""
    params = params.to(images.device, torch.float32)
    ops, factors, means = params[:, :3], params[:, 3:6], params[:, 6]
    batch_shape = (-1, 1, 1, 1)
    for position in range(3):
        op = ops[:, position].view(batch_shape)
        factor = factors[:, position].view(batch_shape)
        factor = torch.where(op == NO_OP, torch.ones_like(factor), factor)
        degenerate = torch.where(op == SATURATION, grey(images),
                                 torch.where(op == CONTRAST, means.view(batch_shape), torch.zeros_like(factor)))
        images = torch.floor((degenerate + factor * (images - degenerate)).clamp_(0.0, 255.0))  # PIL's blend
    return images


class ColorJitter:
    """Draws torchvision ColorJitter's order and factors (hue excluded); a zero strength drops the op and its draw.

    `draw(rng)` → [(op, factor)] in application order, from rng.sample then one rng.uniform per op (torchvision's
    order of draws for PIL images). `params(draws, pixels)` → float32 `[7]` for `apply_color_jitter`."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        strengths = (brightness, contrast, saturation)
        if any(s < 0 for s in strengths):
            raise ValueError(f"color jitter strengths must be >= 0, got {strengths}")
        self.ops = [(op, float(s)) for op, s in enumerate(strengths) if s > 0]

    def draw(self, rng: random.Random) -> list[tuple[int, float]]:
        return [(op, rng.uniform(max(0.0, 1 - s), 1 + s)) for op, s in rng.sample(self.ops, len(self.ops))]

    @staticmethod
    def params(draws: list[tuple[int, float]], pixels: np.ndarray | None) -> torch.Tensor:
        """float32 `[7]` for `draws` on the whole image `pixels` (uint8 `[H, W, 3]`, read only for the contrast mean:
        PIL's rounded grey mean of the image as the ops before contrast leave it; None leaves it 0, for
        `contrast_means` to fill in on the device)."""
        padding = [(NO_OP, 1.0)] * (3 - len(draws))
        ops, factors = zip(*(list(draws) + padding))
        mean = contrast_mean(draws, pixels) if pixels is not None else 0.0
        return torch.tensor([*ops, *factors, mean], dtype=torch.float32)


def contrast_means(thumbnails: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """`contrast_mean` for a batch, on its device: thumbnails of the whole images (float `[B, 3, h, w]`, 0..255) and
    params `[B, 7]` → `[B]` rounded grey means after the ops drawn before contrast (0 where contrast is not drawn)."""
    ops = params[:, :3]
    is_contrast = ops == CONTRAST  # [B, 3]
    position = torch.where(is_contrast.any(1), is_contrast.float().argmax(1), torch.full_like(ops[:, 0], 3).long())
    before = torch.arange(3, device=params.device)[None] < position[:, None]  # [B, 3]: ops applied before contrast
    prior = params.clone()
    prior[:, :3] = torch.where(before, ops, torch.full_like(ops, NO_OP))
    means = torch.floor(grey(apply_color_jitter(thumbnails, prior)).mean(dim=(1, 2, 3)) + 0.5)
    return torch.where(is_contrast.any(1), means, torch.zeros_like(means))


def contrast_mean(draws: list[tuple[int, float]], pixels: np.ndarray) -> float:
    """PIL's contrast grey mean for `draws` on uint8 `[H, W, 3]` pixels: int(mean + 0.5) of the grey image after the
    ops drawn before contrast, over a strided grid of ~_MEAN_SAMPLES pixels; 0 when contrast is not drawn.
    numpy, not `apply_color_jitter`: torch's per-op overhead on a small array costs a worker ~0.5 ms a sample."""
    if CONTRAST not in [op for op, _ in draws]:
        return 0.0
    step = max(1, round(np.sqrt(pixels.shape[0] * pixels.shape[1] / _MEAN_SAMPLES)))
    sample = pixels[::step, ::step].astype(np.float32)  # [h, w, 3]
    for op, factor in draws:
        if op == CONTRAST:
            return float(np.floor(_grey_hwc(sample).mean(dtype=np.float64) + 0.5))
        degenerate = _grey_hwc(sample)[..., None] if op == SATURATION else np.float32(0.0)
        sample = np.floor(np.clip(degenerate + np.float32(factor) * (sample - degenerate), 0.0, 255.0))
    raise AssertionError("unreachable: contrast was drawn")


def _grey_hwc(pixels: np.ndarray) -> np.ndarray:
    """`grey` for float32 `[..., 3]` arrays → `[...]`."""
    weighted = pixels @ np.array(_GREY_WEIGHTS, dtype=np.float32) + np.float32(32768.0)
    return np.floor(weighted / np.float32(65536.0))

"""Mixup / CutMix in timm's batch mode, with label-smoothed soft targets, and the matching soft-target loss.

Batch mode: one lam and one choice (mixup or cutmix) per batch; every sample i is mixed with sample B-1-i (the
batch flipped), so the batch size must be even. CutMix pastes one box from the flipped batch and corrects lam to
the exact pasted area fraction. Targets: smoothed one-hot y (on = 1 - s + s/K, off = s/K) mixed as
lam·y + (1 - lam)·flip(y), so each row sums to 1.

Randomness: `__call__(x, target, rng)` draws from the numpy Generator `rng`, so a training loop that passes
`np.random.default_rng([seed, step])` gets the same mixing after a resume. None → a generator seeded from numpy's
global RNG (np.random.seed reproduces it, as with timm).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def smoothed_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels [B] long → [B, num_classes] float: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    out = torch.full((target.shape[0], num_classes), off_value, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on_value)


def mixup_target(target: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """Labels [B] → soft targets [B, num_classes] = lam·y + (1 - lam)·y.flip(0), y smoothed one-hot."""
    y = smoothed_one_hot(target, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm rand_bbox: a box of sides ~ sqrt(1 - lam)·(H, W) centred uniformly, clipped → (y0, y1, x0, x1)."""
    cut_ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


class Mixup:
    """timm Mixup (mode "batch") with label smoothing.

    Args:
        mixup_alpha: Beta(alpha, alpha) of mixup's lam; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) of cutmix's lam; 0 disables cutmix.
        prob: probability of mixing a batch at all (otherwise lam = 1, targets only smoothed).
        switch_prob: probability of cutmix instead of mixup when both are enabled.
        mode: only "batch" (timm's default and BEiT's).
        label_smoothing: smoothing of the one-hot targets.
        num_classes: number of classes K.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1,
                 num_classes: int = 1000):
        if mode != "batch":
            raise ValueError(f"Mixup mode {mode!r} is not supported; only 'batch' (timm's default, used by BEiT)")
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 and not both 0 (to disable mixing, do not "
                             f"build a Mixup); got {mixup_alpha}, {cutmix_alpha}")
        if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1 or not 0 <= label_smoothing < 1:
            raise ValueError(f"prob and switch_prob must be in [0, 1], label_smoothing in [0, 1); got {prob}, "
                             f"{switch_prob}, {label_smoothing}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def sample_params(self, rng: np.random.Generator) -> tuple[float, bool]:
        """→ (lam, use_cutmix) for one batch; lam = 1.0 means no mixing."""
        if rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, x: torch.Tensor, target: torch.Tensor,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, H, W] (mixed in place) and labels [B] → (x, soft targets [B, num_classes]); B even."""
        if x.shape[0] % 2 != 0:
            raise ValueError(f"Mixup needs an even batch size (each sample is mixed with its mirror in the batch), "
                             f"got {x.shape[0]}; use drop_last=True and an even batch size")
        if target.shape != (x.shape[0],):
            raise ValueError(f"target must be labels of shape [{x.shape[0]}], got {tuple(target.shape)}")
        if rng is None:  # seeded from numpy's global state, so np.random.seed(s) reproduces the mixing
            rng = np.random.default_rng(np.random.randint(0, 2**31))
        lam, use_cutmix = self.sample_params(rng)
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(x.shape[-2] * x.shape[-1])  # the exact pasted fraction
            else:
                flipped = x.flip(0).mul_(1.0 - lam)  # a copy, taken before x is scaled in place
                x.mul_(lam).add_(flipped)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with soft targets: mean over rows of -Σ_k target_k · log_softmax(logits)_k."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, K], target [B, K] (rows summing to 1) → scalar."""
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

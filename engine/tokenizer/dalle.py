"""The DALL-E discrete VAE (openai/DALL-E `dall_e/{encoder,decoder,utils}.py`), re-implemented in plain PyTorch.

Module and parameter names match DALL-E's attrs classes so the released weights map 1:1 (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.b`, `blocks.output.conv.w`, ...). At the defaults (group_count=4, n_hid=256,
n_blk_per_group=2, vocab_size=8192) the encoder maps 112 px to a 14×14 token grid and has ≈53.8M parameters, the
decoder ≈43.8M. Smaller widths and group counts give small tokenizers (downsampling 2^(group_count-1)).

Shapes: B batch, V vocab, H×W pixels, h×w token grid (H / 2^(group_count-1)).
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] → [eps, 1 - eps], the range the encoder was trained on (any shape)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1] (any shape)."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv2d(nn.Module):
    """DALL-E's convolution: weight `w` [n_out, n_in, kw, kw], bias `b` [n_out], 'same' padding.

    `use_float16=False` pins a conv to fp32 whatever the weights' or autocast's dtype (the vocab-sized convs, as in
    DALL-E); the others compute in their weights' dtype (or autocast's), see `VisualTokenizer`.
    """

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd for 'same' padding, got {kw}")
        self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=(n_in * kw**2) ** -0.5))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_float16:
            return F.conv2d(x.to(self.w.dtype), self.w, self.b, padding=self.kw // 2)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=self.kw // 2)


class _ResidualBlock(nn.Module):
    """id_path(x) + post_gain · res_path(x); res_path = 4 × (ReLU → conv) with hidden width n_out / 4."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernel_widths: tuple[int, int, int, int]):
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2  # keeps the sum of n_layers residual branches at unit scale
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kw in enumerate(kernel_widths):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_ResidualBlock):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers, kernel_widths=(3, 3, 3, 1))


class DecoderBlock(_ResidualBlock):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers, kernel_widths=(1, 3, 3, 3))


def _group(blocks: list[nn.Module], resample: tuple[str, nn.Module] | None) -> nn.Sequential:
    named = [(f"block_{i + 1}", block) for i, block in enumerate(blocks)]
    return nn.Sequential(OrderedDict(named + ([resample] if resample else [])))


class DalleEncoder(nn.Module):
    """Images [B, C, H, W] (pixels through `map_pixels`) → token logits [B, V, h, w] (fp32).

    Groups run at 1, 2, 4, ... × n_hid channels with a 2× max-pool after every group but the last.
    """

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = 8192):
        super().__init__()
        if group_count < 1 or n_blk_per_group < 1:
            raise ValueError(f"group_count and n_blk_per_group must be >= 1, got {group_count}, {n_blk_per_group}")
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**g for g in range(group_count)]  # [256, 512, 1024, 2048] at the defaults
        groups = [("input", Conv2d(input_channels, n_hid, 7))]
        for g, width in enumerate(widths):
            n_in = widths[max(g - 1, 0)]
            blocks = [EncoderBlock(n_in if i == 0 else width, width, n_layers) for i in range(n_blk_per_group)]
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < group_count - 1 else None
            groups.append((f"group_{g + 1}", _group(blocks, pool)))
        groups.append(("output", nn.Sequential(OrderedDict(
            [("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    @property
    def config(self) -> dict:
        return dict(group_count=self.group_count, n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group,
                    input_channels=self.input_channels, vocab_size=self.vocab_size)

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected images [B, {self.input_channels}, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by {self.downsample}")
        return self.blocks(x)


class DalleDecoder(nn.Module):
    """Token one-hots (or Gumbel-softmax relaxations) [B, V, h, w] → [B, 2·C, H, W] logit-Laplace parameters.

    Channels [:C] are μ (the reconstruction is `unmap_pixels(sigmoid(μ))`), [C:] the log-scales. Groups run at
    2^(g-1), ..., 2, 1 × n_hid channels with a nearest 2× upsampling after every group but the last.
    """

    def __init__(self, group_count: int = 4, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2,
                 output_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        if group_count < 1 or n_blk_per_group < 1:
            raise ValueError(f"group_count and n_blk_per_group must be >= 1, got {group_count}, {n_blk_per_group}")
        self.group_count, self.n_init, self.n_hid, self.n_blk_per_group = group_count, n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**g for g in reversed(range(group_count))]  # [2048, 1024, 512, 256] at the defaults
        groups = [("input", Conv2d(vocab_size, n_init, 1, use_float16=False))]
        for g, width in enumerate(widths):
            n_in = n_init if g == 0 else widths[g - 1]
            blocks = [DecoderBlock(n_in if i == 0 else width, width, n_layers) for i in range(n_blk_per_group)]
            upsample = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < group_count - 1 else None
            groups.append((f"group_{g + 1}", _group(blocks, upsample)))
        groups.append(("output", nn.Sequential(OrderedDict(
            [("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    @property
    def config(self) -> dict:
        return dict(group_count=self.group_count, n_init=self.n_init, n_hid=self.n_hid,
                    n_blk_per_group=self.n_blk_per_group, output_channels=self.output_channels,
                    vocab_size=self.vocab_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.vocab_size:
            raise ValueError(f"expected token maps [B, {self.vocab_size}, h, w], got shape {tuple(z.shape)}")
        return self.blocks(z)

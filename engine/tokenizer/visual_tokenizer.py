"""The frozen tokenizer used by masked-image-model pretraining: images → visual token ids (the MIM labels)."""

import logging

import torch
from torch import nn

from engine.config import ConfigError
from engine.tokenizer.dalle import DalleEncoder

logger = logging.getLogger(__name__)


class VisualTokenizer(nn.Module):
    """A frozen DALL-E encoder in eval mode, channels_last; no gradients.

    On CUDA the convolutions run in `low_precision` (bf16 by default; DALL-E used fp16) and the output conv in fp32,
    as in DALL-E; on CPU everything runs in fp32. Images are the tokenizer view *after* `map_pixels`, as in BEiT
    (`ToTensor` + `map_pixels` in the data transform), shape [B, 3, input_size, input_size].
    """

    def __init__(self, encoder: DalleEncoder, input_size: int):
        super().__init__()
        if input_size % encoder.downsample:
            raise ValueError(f"input_size {input_size} is not divisible by the encoder's downsampling "
                             f"{encoder.downsample}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.input_size = input_size

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.input_size // self.encoder.downsample
        return side, side

    def prepare(self, device: torch.device | str, low_precision: torch.dtype = torch.bfloat16) -> "VisualTokenizer":
        """Moves to `device`; on CUDA casts every conv but the fp32-pinned ones to `low_precision`."""
        device = torch.device(device)
        self.to(device=device, memory_format=torch.channels_last)
        if device.type == "cuda":
            for module in self.encoder.modules():
                if getattr(module, "use_float16", False):
                    module.to(low_precision)
        dtype = low_precision if device.type == "cuda" else torch.float32
        logger.info("tokenizer on %s: convs in %s, output conv in fp32, channels_last", device, dtype)
        return self

    def train(self, mode: bool = True) -> "VisualTokenizer":
        return super().train(False)  # always frozen, even inside a model put in train mode

    @torch.no_grad()
    def get_codebook_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Mapped images [B, 3, S, S] → token probabilities [B, V, h, w] (fp32)."""
        return self._logits(images).softmax(dim=1)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """Mapped images [B, 3, S, S] → encoder logits [B, V, h, w] (fp32), after checking the shape."""
        expected = (self.encoder.input_channels, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"tokenizer expects images [B, {', '.join(map(str, expected))}], got "
                             f"{tuple(images.shape)}: set the tokenizer view size (second_input_size) to "
                             f"{self.input_size}")
        return self.encoder(images.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Mapped images [B, 3, S, S] → token ids [B, h·w] (int64, row-major): the argmax of the encoder logits (the
        same as of their softmax, which is not computed)."""
        return self._logits(images).argmax(dim=1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_codebook_indices(images)


def check_tokenizer_compatible(tokenizer: VisualTokenizer, vocab_size: int, token_grid: tuple[int, int] | int,
                               input_size: int) -> None:
    """Raises ValueError, before training starts, when `tokenizer` does not fit the model and data config."""
    grid = (token_grid, token_grid) if isinstance(token_grid, int) else tuple(token_grid)
    problems = []
    if tokenizer.vocab_size != vocab_size:
        problems.append(f"vocab size {tokenizer.vocab_size} != model vocab_size {vocab_size} "
                        f"(set the model's vocab_size to {tokenizer.vocab_size})")
    if tokenizer.input_size != input_size:
        problems.append(f"input size {tokenizer.input_size} px != tokenizer view size {input_size} px "
                        f"(set second_input_size={tokenizer.input_size})")
    if tokenizer.token_grid != grid:
        problems.append(f"token grid {tokenizer.token_grid} != model patch grid {grid} (the tokenizer's "
                        f"{tokenizer.encoder.downsample}× downsampling must give the patch grid)")
    if problems:
        raise ConfigError("tokenizer does not match the pretraining config: " + "; ".join(problems))

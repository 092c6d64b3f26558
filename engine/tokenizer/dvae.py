"""The discrete-VAE training objective of DALL-E (Ramesh et al. 2021, sec. 2.1) for our own small tokenizers.

The encoder's logits define q(token | image) per grid cell; a Gumbel-softmax sample (temperature annealed towards
1/16) feeds the decoder, which models pixels with a logit-Laplace (or, simpler, a squared-error) likelihood. A KL term
to the uniform prior over the vocabulary, its weight warmed up linearly, keeps the codebook in use.
Shapes: B batch, V vocab, h×w token grid, C=3 colour channels, H×W pixels.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.tokenizer.dalle import DalleDecoder, DalleEncoder, map_pixels, unmap_pixels

ReconLoss = Literal["logit_laplace", "mse"]


def gumbel_temperature(step: int, anneal_steps: int, start: float = 1.0, end: float = 1 / 16) -> float:
    """Exponential decay from `start` at step 0 to `end` at `anneal_steps`, constant after."""
    progress = min(step / max(anneal_steps, 1), 1.0)
    return start * (end / start) ** progress


def kl_weight(step: int, warmup_steps: int, max_weight: float) -> float:
    """Linear warmup from 0 to `max_weight` over `warmup_steps`, constant after."""
    return max_weight * min(step / max(warmup_steps, 1), 1.0)


def logit_laplace_nll(x_mapped: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of mapped pixels [B, C, H, W] under the decoder's logit-Laplace [B, 2C, H, W].

    Omits the data-only term log(x(1-x)), which has no gradient.
    """
    mu, log_scale = params.float().chunk(2, dim=1)
    return ((torch.logit(x_mapped) - mu).abs() * torch.exp(-log_scale) + log_scale + math.log(2)).mean()


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ uniform) per grid cell, averaged: logits [B, V, h, w] → scalar in [0, log V]."""
    log_q = logits.float().log_softmax(dim=1)
    return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=1).mean()


class DiscreteVAE(nn.Module):
    """Encoder + decoder trained jointly; images are pixels in [0, 1], [B, C, H, W]."""

    def __init__(self, encoder: DalleEncoder, decoder: DalleDecoder, recon_loss: ReconLoss = "logit_laplace",
                 hard_gumbel: bool = False):
        super().__init__()
        if encoder.vocab_size != decoder.vocab_size or encoder.group_count != decoder.group_count:
            raise ValueError("encoder and decoder must share vocab_size and group_count")
        self.encoder, self.decoder, self.recon_loss = encoder, decoder, recon_loss
        self.hard_gumbel = hard_gumbel  # straight-through: the decoder sees one-hots, gradients flow via the relaxation

    def forward(self, images: torch.Tensor, temperature: float, kl_beta: float) -> dict[str, torch.Tensor]:
        """→ {"loss", "recon", "kl"} scalars; loss = recon + kl_beta · kl."""
        x = map_pixels(images)
        logits = self.encoder(x)  # [B, V, h, w], fp32
        z = F.gumbel_softmax(logits, tau=temperature, hard=self.hard_gumbel, dim=1)  # relaxed one-hot [B, V, h, w]
        params = self.decoder(z)  # [B, 2C, H, W]
        if self.recon_loss == "logit_laplace":
            recon = logit_laplace_nll(x, params)
        else:
            recon = F.mse_loss(torch.sigmoid(params[:, : x.shape[1]].float()), x)
        kl = kl_to_uniform(logits)
        return {"loss": recon + kl_beta * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard (argmax) tokens, as pretraining uses them → (reconstruction [B, C, H, W] in [0, 1], ids [B, h, w])."""
        ids = self.encoder(map_pixels(images)).argmax(dim=1)
        one_hot = F.one_hot(ids, self.encoder.vocab_size).permute(0, 3, 1, 2).float()
        mu = self.decoder(one_hot)[:, : images.shape[1]].float()
        return unmap_pixels(torch.sigmoid(mu)), ids

"""Has pretraining learned to use context? A fixed held-out batch, scored against the position prior.

The position prior predicts, for each grid position, the token distribution seen there in training images (no
context at all). A masked-token loss above the prior's means the model has learned little beyond which tokens are
common where; once it drops below, it reads the visible patches. Both are measured on the same fixed held-out images
and masks, so the comparison is exact and the numbers are comparable across steps and runs.
"""

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PRIOR_IMAGES = 2048  # training images whose token grids give the position prior
PRIOR_SMOOTHING = 0.5  # added to every (position, token) count, so unseen tokens cost a finite loss


@dataclass
class HeldOutBatch:
    patch_views: torch.Tensor  # [B, 3, H, W]
    masks: torch.Tensor  # [B, L] bool
    labels: torch.Tensor  # [B, L] token ids
    prior_loss: float  # cross-entropy of the position prior on the masked patches
    prior_acc: float  # accuracy of the prior's most common token per position

    @torch.no_grad()
    def evaluate(self, engine, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
        """(masked-token loss, accuracy) of the model on this batch, in eval mode (no drop path); host sync."""
        module = engine.module  # called directly (ZeRO-3's gather hooks live on the modules): not a training step
        module.eval()
        loss, stats = module(self.patch_views.to(device, dtype), self.masks.to(device), self.labels.to(device))
        module.train()
        correct, masked = stats[1:].tolist()  # stats: [loss·M, accuracy·M, M]
        return float(loss), correct / max(masked, 1.0)


def _tokenized(dataset, count: int, tokenizer, device: torch.device, keep_views: bool, chunk: int = 256
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The first `count` samples of a MIM dataset (epoch 0, deterministic) → normalised fp32 patch views (only with
    `keep_views`: the prior needs tokens alone), masks, token ids; `chunk` images at a time, so memory stays bounded.
    The dataset's transform finishes its uint8 views (`model_inputs`), as the training step does."""
    total = min(count, len(dataset))
    patch_views, masks, labels = [], [], []
    for start in range(0, total, chunk):
        samples = [dataset[i] for i in range(start, min(start + chunk, total))]
        views, tokenizer_views, jitter, chunk_masks = zip(*samples)
        patches, pixels = dataset.transform.model_inputs(torch.stack(views), torch.stack(tokenizer_views).to(device),
                                                         torch.stack(jitter), torch.float32)
        labels.append(tokenizer.get_codebook_indices(pixels).cpu())  # [n, L]
        masks.append(torch.stack(chunk_masks))
        if keep_views:
            patch_views.append(patches)
    return (torch.cat(patch_views) if patch_views else None), torch.cat(masks), torch.cat(labels)


def position_prior(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids `[n, L]` → log-probabilities `[L, V]` of each token at each position (smoothed counts)."""
    counts = torch.full((labels.shape[1], vocab_size), PRIOR_SMOOTHING)
    counts.scatter_add_(1, labels.T, torch.ones(labels.T.shape))
    return (counts / counts.sum(dim=1, keepdim=True)).log()


def prior_metrics(log_prior: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of predicting each masked patch's token from its position alone."""
    positions = masks.nonzero()[:, 1]  # [M]
    targets = labels[masks]  # [M]
    loss = -log_prior[positions, targets].mean()
    acc = (log_prior.argmax(dim=1)[positions] == targets).float().mean()
    return float(loss), float(acc)


def build_heldout_batch(train_set, test_set, tokenizer, vocab_size: int, num_images: int,
                        device: torch.device) -> HeldOutBatch | None:
    """The fixed batch: `num_images` test-split samples (with masks and tokens) and the prior from training images."""
    if num_images <= 0 or test_set is None:
        return None
    _, _, prior_labels = _tokenized(train_set, PRIOR_IMAGES, tokenizer, device, keep_views=False)
    log_prior = position_prior(prior_labels, vocab_size)
    patch_views, masks, labels = _tokenized(test_set, num_images, tokenizer, device, keep_views=True)
    prior_loss, prior_acc = prior_metrics(log_prior, masks, labels)
    logger.info("held-out check: %d test images; position prior (from %d training images) masked-token loss %.3f, "
                "accuracy %.3f: the model uses context once its held-out loss is below that", len(labels),
                len(prior_labels), prior_loss, prior_acc)
    return HeldOutBatch(patch_views, masks, labels, prior_loss, prior_acc)

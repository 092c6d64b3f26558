"""Masked-token LM loss: gather the masked rows, apply the LM head, cross-entropy and accuracy."""

import torch
import torch.nn.functional as F


def masked_lm_loss_ref(
    hidden: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference (float64-capable; boolean indexing syncs with the host).

    hidden `[B, N, C]` patch tokens, bool_masked_pos `[B, N]`, weight `[V, C]`, bias `[V]` or None, labels `[B, N]`
    (read only at masked positions). Returns (mean cross-entropy over masked tokens, fraction of masked tokens whose
    argmax equals the label). Zero masked tokens give a loss of 0 with zero gradients, never NaN.
    """
    mask = bool_masked_pos.bool()
    rows = hidden[mask]  # [M, C]
    targets = labels[mask].long()  # [M]
    logits = F.linear(rows, weight, bias).float() if rows.dtype != torch.float64 else F.linear(rows, weight, bias)
    count = max(rows.shape[0], 1)  # an empty mask divides a zero sum by one instead of averaging over nothing
    loss = F.cross_entropy(logits, targets, reduction="sum") / count
    accuracy = (logits.argmax(dim=-1) == targets).sum().to(logits.dtype) / count
    return loss, accuracy.detach()

"""Semantic-segmentation metrics as mmseg computes them (`mean_iou`): a K×K confusion matrix accumulated on the device,
summed over ranks once per evaluation, then mIoU / mAcc / aAcc on the host.

Usage per evaluation: `conf = sum(confusion_matrix(logits.argmax(1), labels, K) for each batch)` (device, no host
sync), `conf = reduce_confusion(conf)` (one all-reduce), `segmentation_metrics(conf, class_names)` (one copy to host).

Conventions (mmseg): rows are ground truth, columns predictions; pixels labelled `ignore_index` (and any label
outside [0, K)) are not counted. IoU_k = TP / (GT_k + Pred_k - TP), NaN when class k is absent from both ground truth
and prediction; Acc_k = TP / GT_k, NaN when k is absent from the ground truth. mIoU and mAcc are means over the
non-NaN classes (a class predicted but absent from the ground truth has IoU 0 and counts); aAcc = ΣTP / Σ GT.
"""

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
                     ) -> torch.Tensor:
    """pred, label: integer tensors of the same shape (any, e.g. `[B, H, W]`) → `[K, K]` int64 counts on their device,
    `conf[label, pred]`. Pixels whose label is `ignore_index` or outside [0, K), or whose prediction is outside
    [0, K), are not counted. A fixed-size scatter-add (no boolean indexing, no bincount): no host sync."""
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {list(pred.shape)} and {list(label.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    cells = num_classes * num_classes
    index = torch.where(valid, label * num_classes + pred, cells)  # invalid pixels land in a spare last bin
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=pred.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:cells].view(num_classes, num_classes)


def reduce_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Sum `conf` over ranks in place (one all-reduce) when torch.distributed is initialised; returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(conf, op=dist.ReduceOp.SUM)
    return conf


def _percent(value: float) -> float:
    return 100.0 * value if not math.isnan(value) else float("nan")


def segmentation_metrics(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """`[K, K]` confusion matrix (rows ground truth) → `{"mIoU", "mAcc", "aAcc"}` in percent, plus
    `per_class_iou` and `per_class_acc` (lists of K percentages, NaN for classes without the data to define them,
    see the module docstring) and `class_names` when given. mIoU/mAcc are NaN when no class is defined, aAcc when
    no pixel was counted."""
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be a square [K, K] matrix, got {list(conf.shape)}")
    if class_names is not None and len(class_names) != conf.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {conf.shape[0]}-class confusion matrix")
    conf = conf.detach().to("cpu", torch.float64)
    intersect = conf.diagonal()
    area_label, area_pred = conf.sum(dim=1), conf.sum(dim=0)
    union = area_label + area_pred - intersect
    iou = intersect / union  # 0 / 0 = NaN: class absent from ground truth and prediction
    acc = intersect / area_label  # NaN: class absent from ground truth
    total = area_label.sum().item()
    result = {
        "mIoU": _percent(iou.nanmean().item()),
        "mAcc": _percent(acc.nanmean().item()),
        "aAcc": _percent(intersect.sum().item() / total) if total > 0 else float("nan"),
        "per_class_iou": [_percent(v) for v in iou.tolist()],
        "per_class_acc": [_percent(v) for v in acc.tolist()],
    }
    if class_names is not None:
        result["class_names"] = list(class_names)
    return result

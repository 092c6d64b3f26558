"""COCO evaluation of a detector: its detections → COCO results in the original image's pixels → box and mask AP
from pycocotools' COCOeval (the official metric), over the results of every rank."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.coco import coco_api

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6], in this order
IOU_TYPES = {"bbox": "box", "segm": "mask"}


def coco_results(detections: list[dict], metas: list[dict], category_ids: list[int]) -> list[dict]:
    """torchvision detections (per image `boxes` [N, 4], `labels` [N] in 1..K, `scores` [N], `masks` [N, 1, S, S]
    probabilities, in the padded input's pixels) with their `DetEvalTransform` metas → COCO result dicts:
    `bbox` [x, y, w, h] and an RLE `segmentation` in the original image's pixels, `category_id`, `score`."""
    _, mask_utils = coco_api()
    results = []
    for detection, meta in zip(detections, metas, strict=True):
        if not len(detection["scores"]):
            continue
        height, width = meta["size"]
        resized_h, resized_w = meta["resized"]
        boxes = (detection["boxes"].float() / meta["scale"]).cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        masks = detection["masks"][:, :, :resized_h, :resized_w].float()  # the image, not its padding
        masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)[:, 0] >= 0.5
        masks = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))  # [H, W, N]
        rles = mask_utils.encode(masks)
        for box, label, score, rle in zip(boxes.tolist(), detection["labels"].tolist(),
                                          detection["scores"].float().tolist(), rles, strict=True):
            results.append({"image_id": meta["image_id"], "category_id": category_ids[label - 1], "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return results


def gather_results(results: list[dict]) -> list[dict]:
    """Every rank's results on every rank (one all_gather_object); the list itself without a process group."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return results
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, results)
    return [result for rank_results in everyone for result in rank_results]


def coco_metrics(coco_gt, results: list[dict], image_ids: list[int]) -> dict:
    """Box and mask AP (AP, AP50, AP75, APs, APm, APl, in %) of `results` on the `image_ids` of `coco_gt`, as
    `{"box_AP": …, "mask_AP": …}`. No result at all scores 0 (COCOeval cannot load an empty list)."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for iou_type, prefix in IOU_TYPES.items():
        if not results:
            metrics.update({f"{prefix}_{name}": 0.0 for name in METRIC_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and its table
            evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
            evaluation.params.imgIds = list(image_ids)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        # COCOeval's -1 (no ground truth of that size) becomes None: nothing to find is not an AP of 0
        metrics.update({f"{prefix}_{name}": None if value < 0 else float(value) * 100
                        for name, value in zip(METRIC_NAMES, evaluation.stats[:6], strict=True)})
    return metrics

"""COCO-format detection and instance-segmentation data: the reader and the ViTDet-style pipelines.

Layout (COCO 2017): `root/{train,val}2017/<file_name>` and `root/annotations/instances_{train,val}2017.json` with
`images`, `annotations` (`bbox` [x, y, w, h], `segmentation` as polygons or RLE, `iscrowd`, `category_id`) and
`categories`. Category ids need not be contiguous (COCO's run 1..90 with gaps): the model's labels are 1..K in the
order of the sorted ids (0 is torchvision's background), and `CocoDetection.category_ids[label - 1]` maps back.
Masks are decoded with pycocotools, as the official evaluation decodes them.

Training samples skip crowd annotations (mmdet and detectron2 ignore them in training too) and images with no other
annotation; evaluation keeps every image (pycocotools scores crowd regions as "ignore").

Pipelines (ViTDet's large-scale jitter, "LSJ"): train: resize so the image fits a square of `input_size × s`,
s ~ U(scale_range), keep ratio → random crop of at most `input_size²` → horizontal flip (0.5) → pad to `input_size²`;
boxes clipped to the crop, instances left with no mask pixel dropped. Eval: resize so the long side is `input_size`,
pad. Workers ship uint8 tensors; the model normalises on its device.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import ConfigError
from engine.data.segmentation import read_image

SPLITS = ("train", "val")


def annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def coco_api():
    """pycocotools' (COCO, mask module), or a one-line ConfigError naming the install."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError:
        raise ConfigError("COCO data needs pycocotools: pip install '.[detection]'") from None
    return COCO, mask_utils


def load_coco(path: Path):
    """The annotation file as a pycocotools COCO object; a missing or malformed file is one ConfigError naming it."""
    coco_class, _ = coco_api()
    if not path.is_file():
        raise ConfigError(f"{path}: annotation file not found (a COCO-format folder holds "
                          f"annotations/instances_{{train,val}}2017.json beside train2017/ and val2017/)")
    try:
        dataset = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable JSON annotation file ({err})") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if not isinstance(dataset, dict) or missing:
        raise ConfigError(f"{path}: not a COCO instances file (missing {', '.join(missing) or 'a top-level object'})")
    coco = coco_class()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{path}: malformed COCO annotations ({type(err).__name__}: {err})") from None
    return coco


class CocoDetection:
    """A COCO-format split. `dataset[i]` → (RGB PIL image, target) with target numpy arrays `boxes` float32 [N, 4]
    (x1, y1, x2, y2 pixels), `labels` int64 [N] (1..K), `masks` uint8 [N, H, W] and `image_id`.

    Args:
        root: the folder holding `{split}2017/` and `annotations/`.
        split: "train" or "val".
        training: skip crowd annotations and images left without an annotation (training samples); else every
            image with all its non-crowd annotations (evaluation runs on `coco`, crowd included).
        category_ids: the label order of another split (validation must use training's); None: this file's sorted
            category ids.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", training: bool = True,
                 category_ids: list[int] | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = Path(root), split
        self.image_dir = self.root / f"{split}2017"
        if not self.image_dir.is_dir():
            raise ConfigError(f"{self.image_dir}: image folder not found (a COCO-format folder holds train2017/, "
                              f"val2017/ and annotations/)")
        self.coco = load_coco(annotation_file(self.root, split))
        own = sorted(self.coco.getCatIds())
        if not own:
            raise ConfigError(f"{annotation_file(self.root, split)}: no categories")
        self.category_ids = list(category_ids) if category_ids is not None else own
        unknown = sorted(set(own) - set(self.category_ids))
        if unknown:
            raise ConfigError(f"{annotation_file(self.root, split)}: category ids {unknown} are not in the training "
                              f"categories {self.category_ids}")
        self.label_of = {category: label for label, category in enumerate(self.category_ids, start=1)}
        self.class_names = [self.coco.cats[c]["name"] if c in self.coco.cats else str(c) for c in self.category_ids]
        self.image_ids = [image_id for image_id in sorted(self.coco.getImgIds())
                          if not training or self._annotations(image_id)]
        if not self.image_ids:
            raise ConfigError(f"{annotation_file(self.root, split)}: no image with a (non-crowd) annotation")

    def _annotations(self, image_id: int) -> list[dict]:
        annotations = self.coco.imgToAnns.get(image_id, [])
        return [a for a in annotations if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise ConfigError(f"{path}: image of id {image_id} not found (listed in "
                              f"{annotation_file(self.root, self.split).name})")
        image = read_image(path)
        height, width = int(info["height"]), int(info["width"])
        if image.size != (width, height):
            raise ConfigError(f"{path}: the image is {image.width}x{image.height} but its annotation file says "
                              f"{width}x{height}")
        annotations = self._annotations(image_id)
        masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
        for i, annotation in enumerate(annotations):
            try:
                masks[i] = self.coco.annToMask(annotation)
            except Exception as err:  # pycocotools raises bare Exceptions for malformed polygons / RLE
                raise ConfigError(f"{annotation_file(self.root, self.split)}: annotation {annotation.get('id')} of "
                                  f"image {image_id}: unreadable segmentation ({err})") from None
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [x, y, w, h] → [x1, y1, x2, y2]
        try:
            labels = np.array([self.label_of[a["category_id"]] for a in annotations], dtype=np.int64)
        except KeyError as err:
            raise ConfigError(f"{annotation_file(self.root, self.split)}: image {image_id} has an annotation of "
                              f"category {err} not listed in categories") from None
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}


def _resize(image: Image.Image, target: dict, scale: float) -> tuple[Image.Image, dict]:
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    masks = np.stack([np.asarray(Image.fromarray(m).resize((width, height), Image.Resampling.NEAREST))
                      for m in target["masks"]]) if len(target["masks"]) else \
        np.zeros((0, height, width), dtype=np.uint8)
    return image, {**target, "boxes": target["boxes"] * scale, "masks": masks}


def _padded(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the image at the top left, zeros elsewhere (detectron2's square pad)."""
    pixels = torch.zeros(3, size, size, dtype=torch.uint8)
    pixels[:, :image.height, :image.width] = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels


def _tensors(target: dict) -> dict:
    return {"boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], dtype=np.float32)),
            "labels": torch.from_numpy(target["labels"]),
            "masks": torch.from_numpy(np.ascontiguousarray(target["masks"]))}


class DetTrainTransform:
    """Large-scale jitter: `transform(image, target, rng)` → (uint8 [3, S, S], target tensors with `boxes`,
    `labels`, `masks` uint8 [N, S, S]). Every draw comes from `rng`."""

    def __init__(self, input_size: int, scale_range: tuple[float, float] = (0.1, 2.0), flip: float = 0.5):
        if input_size < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"need input_size >= 1 and 0 < scale low <= high, got {input_size}, {scale_range}")
        self.input_size, self.scale_range, self.flip = input_size, tuple(scale_range), flip

    def __call__(self, image: Image.Image, target: dict, rng: random.Random) -> tuple[torch.Tensor, dict]:
        size = self.input_size
        side = size * rng.uniform(*self.scale_range)  # ResizeScale: fit into side × side, keep ratio
        image, target = _resize(image, target, side / max(image.width, image.height))
        left = rng.randint(0, max(image.width - size, 0))  # FixedSizeCrop: a random crop of at most size²
        top = rng.randint(0, max(image.height - size, 0))
        right, bottom = min(left + size, image.width), min(top + size, image.height)
        image = image.crop((left, top, right, bottom))
        masks = target["masks"][:, top:bottom, left:right]
        boxes = target["boxes"] - np.array([left, top, left, top], dtype=np.float32)
        boxes = np.clip(boxes, 0, [right - left, bottom - top, right - left, bottom - top])
        if rng.random() < self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            masks = masks[:, :, ::-1]
            boxes = np.stack([image.width - boxes[:, 2], boxes[:, 1], image.width - boxes[:, 0], boxes[:, 3]], axis=1)
        keep = masks.reshape(len(masks), -1).any(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        padded_masks = np.zeros((int(keep.sum()), size, size), dtype=np.uint8)
        padded_masks[:, :image.height, :image.width] = masks[keep]
        return _padded(image, size), _tensors({"boxes": boxes[keep], "labels": target["labels"][keep],
                                                "masks": padded_masks})


class DetEvalTransform:
    """`transform(image, target)` → (uint8 [3, S, S]: long side resized to S, padded; meta dict with `image_id`,
    `scale` (resized / original), `size` (original (h, w)) and `resized` ((h, w) inside the padding)). Ground truth
    stays in the COCO file."""

    def __init__(self, input_size: int):
        self.input_size = input_size

    def __call__(self, image: Image.Image, target: dict, rng: random.Random | None = None) -> tuple[torch.Tensor, dict]:
        scale = self.input_size / max(image.width, image.height)
        size = (image.height, image.width)
        resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                               Image.Resampling.BILINEAR)
        return _padded(resized, self.input_size), {"image_id": target["image_id"], "scale": scale, "size": size,
                                                    "resized": (resized.height, resized.width)}


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """(images uint8 [B, 3, S, S], the B targets or metas as a list: their instance counts differ)."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]

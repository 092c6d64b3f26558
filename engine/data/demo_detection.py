"""The CPU detection demo's data (recipes/detect_demo.py): a small COCO-format set generated from the embedded
photographs and Fashion-MNIST garments (the segmentation demo's images), each visible pasted garment one instance
with its mask, written once and reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.coco import annotation_file, coco_api
from engine.data.datasets import FASHION_MNIST_CLASSES, embedded_dataset
from engine.data.demo_segmentation import build_once, demo_sample

_DEMO_VERSION = 1  # bump when the generator changes, so stale sets on disk are rebuilt
MIN_INSTANCE_PIXELS = 4  # a garment almost hidden by later ones is not annotated


def _annotations(instances: np.ndarray, classes: list[int], image_id: int, first_id: int, mask_utils) -> list[dict]:
    """One COCO annotation (RLE mask, bbox, area) per garment still visible in the instance map."""
    annotations = []
    for number, garment_class in enumerate(classes, start=1):
        mask = np.asfortranarray(instances == number, dtype=np.uint8)
        if int(mask.sum()) < MIN_INSTANCE_PIXELS:
            continue
        rle = mask_utils.encode(mask)
        annotations.append({"id": first_id + len(annotations), "image_id": image_id,
                            "category_id": garment_class + 1, "iscrowd": 0,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle))})
    return annotations


def build_demo_detection(root: str | os.PathLike, num_train: int = 2000, num_val: int = 200, image_size: int = 32,
                         seed: int = 0, garment_scale: tuple[float, float] = (0.3, 0.6), max_garments: int = 3,
                         grey: bool = True) -> Path:
    """Writes (once) a COCO-format set under `root` (`train2017/`, `val2017/`, `annotations/`) and returns `root`.

    The images are `engine.data.demo_segmentation.demo_sample`s (a photo crop with 1..max_garments garments, white
    on a darkened grey photo with `grey`, else tinted on colour; training garments from the embedded train split,
    validation from the test split); every garment with at least MIN_INSTANCE_PIXELS visible pixels is an instance
    of its Fashion-MNIST class (category ids 1..10). Sample i of a split depends only on (seed, split, i). Built in
    a private folder and renamed into place (`build_once`).
    """
    for name, value, lowest in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 16),
                                ("seed", seed, 0), ("max_garments", max_garments, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
    _, mask_utils = coco_api()
    params = {"version": _DEMO_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
              "seed": seed, "garment_scale": list(garment_scale), "max_garments": max_garments, "grey": grey}
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(FASHION_MNIST_CLASSES)]

    def write(building: Path, photos: list[Image.Image]) -> None:
        for stream, (split, source, count) in enumerate((("train", "train", num_train), ("val", "test", num_val))):
            garments = embedded_dataset("fashion_mnist", source)
            image_dir = building / f"{split}2017"
            image_dir.mkdir(parents=True)
            images, annotations = [], []
            for index in range(count):
                rng = np.random.default_rng([seed, stream, index])
                image, _, instances, classes = demo_sample(photos, garments.images, garments.labels, image_size,
                                                           rng, garment_scale, max_garments, grey)
                name = f"{index:06d}.jpg"
                Image.fromarray(image, "RGB").save(image_dir / name, quality=95)
                images.append({"id": index + 1, "file_name": name, "height": image_size, "width": image_size})
                annotations += _annotations(instances, classes, index + 1, len(annotations) + 1, mask_utils)
            path = annotation_file(building, split)
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))

    return build_once(Path(root), params, write, "demo detection set")

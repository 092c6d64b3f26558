"""The CPU segmentation demo's data (recipes/segment_demo.py): a small ADE20K-format set generated from the embedded
photographs and Fashion-MNIST garments, written once and reused."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from engine.config import ConfigError
from engine.data.datasets import FASHION_MNIST_CLASSES, PHOTOS_DIR, embedded_dataset
from engine.data.segmentation import read_image

DEMO_CLASSES = ("background",) + FASHION_MNIST_CLASSES  # label after reduce_zero_label = index
_DEMO_VERSION = 1  # bump when the demo generator changes, so stale sets on disk are rebuilt


def demo_sample(photos: list[Image.Image], garments_images: np.ndarray, garments_labels: np.ndarray, size: int,
                rng: np.random.Generator, garment_scale: tuple[float, float], max_garments: int,
                grey: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """One demo sample: a random square crop of a photo, then 1..max_garments tinted garments pasted over it →
    (image uint8 [size, size, 3], raw label uint8 [size, size]: 0 ignore, 1 background, 2 + garment class,
    instances uint8 [size, size]: k where the k-th pasted garment is visible, else 0, the pasted garments'
    classes in order)."""
    photo = photos[rng.integers(len(photos))]
    short = min(photo.size)
    side = int(rng.integers(short // 3, short + 1))
    left, top = int(rng.integers(photo.width - side + 1)), int(rng.integers(photo.height - side + 1))
    background = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    image = np.asarray(background, dtype=np.float32)[:, :: 1 if rng.random() < 0.5 else -1].copy()
    if grey:  # Fashion-MNIST-like: white garments over a darkened grey photo
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2) * 0.4
    label = np.ones((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint8)
    classes = []
    for number in range(1, int(rng.integers(1, max_garments + 1)) + 1):
        index = int(rng.integers(len(garments_labels)))
        side = min(size, max(4, round(size * rng.uniform(*garment_scale))))
        classes.append(int(garments_labels[index]))
        garment = Image.fromarray(garments_images[index]).resize((side, side), Image.Resampling.BILINEAR)
        alpha = np.asarray(garment, dtype=np.float32)[..., None]  # [side, side, 1]
        alpha /= max(float(alpha.max()), 1.0)  # intensity stretched per garment: dark garments stay visible
        top, left = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
        region = (slice(top, top + side), slice(left, left + side))
        # of 4 random colours, the farthest from the region's mean, so that garments rarely vanish into it
        tints = rng.integers(0, 256, (4, 3)).astype(np.float32)
        tint = np.full(3, 255.0) if grey else tints[np.abs(tints - image[region].mean((0, 1))).sum(1).argmax()]
        image[region] = image[region] * (1 - alpha) + tint * alpha
        alpha = alpha[..., 0]
        label[region] = np.where(alpha >= 0.5, garments_labels[index] + 2,
                                 np.where(alpha > 0.1, 0, label[region]))  # faint edges: ignored
        instances[region] = np.where(alpha >= 0.5, number, np.where(alpha > 0.1, 0, instances[region]))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label, instances, classes


def _marker_params(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def build_demo_segmentation(root: str | os.PathLike, num_train: int = 2000, num_val: int = 200,
                            image_size: int = 56, seed: int = 0, garment_scale: tuple[float, float] = (0.4, 0.8),
                            max_garments: int = 3, grey: bool = False) -> Path:
    """Writes (once) a small ADE20K-format set under `root` and returns `root`.

    Each image (image_size², JPEG quality 95) is a crop of a photo from assets/photos/ with 1..max_garments
    Fashion-MNIST garments pasted on it (training: the embedded train images; validation: the embedded test images),
    each garment_scale × image_size wide (uniform in the range), with a random tint and alpha = intensity / the
    garment's maximum; later garments occlude earlier ones. PNG labels: 0 = ignore (faint garment pixels, alpha in
    (0.1, 0.5)), 1 = background, 2..11 = garment class + 2, so after `reduce_zero_label` 11 classes named by
    DEMO_CLASSES. Sample i of a split depends only on (seed, split, i).

    Idempotent: `root/.complete` records the parameters; a complete set with the same ones is reused. The set is
    written to a temporary folder and renamed into place, so an interrupted build leaves nothing half-written.
    """
    for name, value, lowest in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 1),
                                ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 (garments are ~0.4-0.8 of it), got {image_size}")
    root = Path(root)
    if not (0 < garment_scale[0] <= garment_scale[1] <= 1) or max_garments < 1:
        raise ValueError(f"need 0 < garment_scale low <= high <= 1 and max_garments >= 1, got {garment_scale}, "
                         f"{max_garments}")
    params = {"version": _DEMO_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
              "seed": seed, "garment_scale": list(garment_scale), "max_garments": max_garments, "grey": grey}

    def write(building: Path, photos: list[Image.Image]) -> None:
        for stream, (split, source, count) in enumerate((("training", "train", num_train),
                                                         ("validation", "test", num_val))):
            garments = embedded_dataset("fashion_mnist", source)
            image_dir, label_dir = building / "images" / split, building / "annotations" / split
            image_dir.mkdir(parents=True)
            label_dir.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([seed, stream, index])
                image, label, _, _ = demo_sample(photos, garments.images, garments.labels, image_size, rng,
                                                 garment_scale, max_garments, grey)
                Image.fromarray(image, "RGB").save(image_dir / f"{split}_{index:05d}.jpg", quality=95)
                Image.fromarray(label, "L").save(label_dir / f"{split}_{index:05d}.png")

    return build_once(root, params, write, "demo segmentation set")


def build_once(root: Path, params: dict, write: Callable[[Path, list[Image.Image]], None], what: str) -> Path:
    """`write(folder, photos)` into a private folder renamed to `root` once complete, unless `root/.complete`
    already records `params` (then `root` is reused); returns `root`. An interrupted build leaves nothing
    half-written; a finished set with other parameters is replaced; a foreign non-empty `root` is refused."""
    marker = root / ".complete"
    if _marker_params(marker) == params:
        return root
    if root.exists() and not marker.is_file() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root} exists and is not a {what} (no .complete marker); remove it or choose another "
                          f"root")
    photo_paths = sorted(PHOTOS_DIR.glob("*.jpg"))
    if not photo_paths:
        raise ConfigError(f"{PHOTOS_DIR}: no background photos; reinstall the package (tools/embed_photos.py)")
    photos = [read_image(path) for path in photo_paths]
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))  # private (0700)
    building = scratch / root.name
    building.mkdir()  # the folder that becomes root: the usual permissions (umask)
    try:
        write(building, photos)
        (building / ".complete").write_text(json.dumps(params, sort_keys=True))
        if root.exists() and any(root.iterdir()):  # ours, other parameters: move it aside, then replace it
            os.replace(root, scratch / "stale")
        try:
            os.replace(building, root)  # atomic; replaces an empty folder
        except OSError:
            if _marker_params(marker) != params:  # not a concurrent builder that finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root

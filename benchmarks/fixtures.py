"""Inputs the benchmarks make for themselves, once, from what ships with the package (no download).

- `imagenet_like_folder(root, images, classes)`: an ImageFolder of JPEGs that look like ImageNet files to a decoder
  (random crops of the embedded photos, sizes drawn around ImageNet's 500x375 median, quality 90, ~80 KB).
- `random_dalle_tokenizer(root)`: a DALL-E-architecture tokenizer (engine.tokenizer format, 8192 tokens, 112 px)
  with random weights: the real encoder's shape and cost, not its tokens.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.datasets import PHOTOS_DIR

JPEG_QUALITY = 90
# (width, height) around ImageNet's typical sizes: most images are 500 px on the long side, some larger or smaller
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300), (800, 600), (333, 500))


def imagenet_like_folder(root: str | Path, images: int = 64, classes: int = 4, seed: int = 0) -> Path:
    """`root/train/class_k/*.jpg`, written once (a `.complete` file marks a finished folder); returns `root`."""
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    photos = [Image.open(path).convert("RGB") for path in sorted(PHOTOS_DIR.glob("*.jpg"))]
    for index in range(images):
        photo = photos[rng.integers(len(photos))]
        width, height = SIZES[rng.integers(len(SIZES))]
        crop_w, crop_h = (min(int(size * rng.uniform(0.5, 1.0)), limit)
                          for size, limit in zip((width, height), photo.size))
        left, top = rng.integers(photo.width - crop_w + 1), rng.integers(photo.height - crop_h + 1)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        folder = root / "train" / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:06d}.jpg", quality=JPEG_QUALITY)
    (root / ".complete").write_text("")
    return root


def random_dalle_tokenizer(root: str | Path, seed: int = 0) -> Path:
    """The DALL-E encoder's architecture (default `DalleEncoder`: 4 groups, 256 hidden, 8192 tokens) at 112 px."""
    import torch

    from engine.tokenizer import DalleEncoder, save_tokenizer
    from engine.tokenizer.io import CONFIG_FILE

    root = Path(root)
    if not (root / CONFIG_FILE).is_file():
        torch.manual_seed(seed)
        save_tokenizer(root, DalleEncoder(), input_size=112)
    return root

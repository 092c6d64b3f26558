"""Extracts the background photographs of the demo segmentation set from a scikit-image wheel.

    python tools/embed_photos.py /path/to/scikit_image-0.26.0-*.whl

writes `engine/data/assets/photos/<name>.jpg`: each image's long side resampled to 256 px (Lanczos), grayscale
textures converted to RGB, JPEG quality 90. Only images that scikit-image's own docstrings
(`skimage/data/_fetchers.py`) declare public domain or CC0 are taken; `engine/data/assets/ATTRIBUTION.md` lists
them. The wheel is only read as a zip: scikit-image is not a dependency of this project.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

from PIL import Image

OUT_DIR = Path(__file__).resolve().parent.parent / "engine" / "data" / "assets" / "photos"

# name → file inside the wheel; the licence each docstring states is in ATTRIBUTION.md
PHOTOS = {
    "astronaut": "skimage/data/astronaut.png",  # NASA, public domain
    "chelsea": "skimage/data/chelsea.png",  # CC0, Stefan van der Walt
    "coffee": "skimage/data/coffee.png",  # CC0, Rachel Michetti
    "rocket": "skimage/data/rocket.jpg",  # SpaceX, public domain
    "hubble_deep_field": "skimage/data/hubble_deep_field.jpg",  # NASA, public domain
    "brick": "skimage/data/brick.png",  # CC0 (CC0Textures), grayscale
    "grass": "skimage/data/grass.png",  # CC0 (DeviantArt, linolafett), grayscale
    "gravel": "skimage/data/gravel.png",  # CC0 (CC0Textures), grayscale
}


def embed_photos(wheel: str | Path, out_dir: str | Path = OUT_DIR, long_side: int = 256, quality: int = 90
                 ) -> list[Path]:
    """Writes every photo of PHOTOS from `wheel` into `out_dir` as `<name>.jpg` → the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for name, member in PHOTOS.items():
            with Image.open(io.BytesIO(archive.read(member))) as source:
                image = source.convert("RGB")
            scale = long_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            path = out_dir / f"{name}.jpg"
            image.resize(size, Image.Resampling.LANCZOS).save(path, quality=quality, optimize=True)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="a scikit-image wheel (.whl)")
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--long-side", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    for path in embed_photos(args.wheel, args.out_dir, args.long_side, args.quality):
        with Image.open(path) as image:
            print(f"{path}: {image.width}x{image.height}, {path.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()

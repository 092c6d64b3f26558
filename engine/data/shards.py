"""Tar shards for network filesystems: an image folder packed into a few large files, read with random access.

A filesystem that serves large files well can still be slow to open 1.28 M small ones (every open is a metadata
round trip). Shards hold the same files, unchanged, in the webdataset layout (`<key>.<ext>` with its label in
`<key>.cls`, consecutive samples per tar), so webdataset and other tar readers can use them too. Beside them,
`index.npy` records where each image's bytes start, so `ShardDataset[i]` reads sample i with one `pread`: the same
samples in the same order as the folder, hence the same batches for a seed and the same exact resume (the sampler
picks indices, it does not stream).

    python -m engine.data.shards /data/imagenet /data/imagenet-shards        # every split: train/, val/ (or test/)
    python -m engine.data.shards /data/imagenet /data/imagenet-shards --samples_per_shard=5000

Layout: `<dst>/<split>/shard-000000.tar ...`, `<dst>/<split>/index.npy` (int64 [N, 4]: shard, byte offset, size,
label) and `<dst>/<split>/meta.json` (format, classes, shard names). `data_path=<dst>` selects it in every recipe.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from engine.config import ConfigError
from engine.data.encoded import EncodedImageDataset

FORMAT = "beit-shards-1"
META_FILE, INDEX_FILE = "meta.json", "index.npy"
SAMPLES_PER_SHARD = 10_000  # ~1.1 GB of ImageNet JPEGs per tar


def is_shard_split(folder: Path) -> bool:
    return (folder / META_FILE).is_file()


class ShardDataset(EncodedImageDataset):
    """One split written by `write_shards`: `dataset[i]` → (RGB uint8 [H, W, 3], label), sample i of the folder it
    was made from. Shard files are opened on first use in each process (DataLoader workers open their own)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / META_FILE).read_text())
            self.index = np.load(self.folder / INDEX_FILE)  # int64 [N, 4]: shard, offset, size, label
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.folder}: not a readable shard split ({err}); write it with `python -m "
                              f"engine.data.shards SRC DST`") from None
        if meta.get("format") != FORMAT or self.index.ndim != 2 or self.index.shape[1] != 4:
            raise ConfigError(f"{self.folder}: shard format {meta.get('format')!r} is not {FORMAT!r}; write the "
                              f"shards again with this version (`python -m engine.data.shards SRC DST`)")
        self.classes = list(meta["classes"])
        self.shards = [self.folder / name for name in meta["shards"]]
        missing = [path for path in self.shards if not path.is_file()]
        if missing:
            raise ConfigError(f"{missing[0]}: shard missing ({len(missing)} of {len(self.shards)}); copy the whole "
                              f"split folder")
        self._files: dict[int, int] = {}  # shard → file descriptor, per process
        self.index_labels(self.index[:, 3])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # descriptors do not cross processes

    def __del__(self) -> None:
        for descriptor in getattr(self, "_files", {}).values():
            os.close(descriptor)

    @property
    def targets(self) -> list[int]:
        return self.index[:, 3].tolist()

    @property
    def num_skipped(self) -> int:
        return self._num_failed_loads

    def __len__(self) -> int:
        return len(self.index)

    def label(self, index: int) -> int:
        return int(self.index[index, 3])

    def describe(self, index: int) -> str:
        shard, offset = self.index[index, :2]
        return f"{self.shards[shard]} (sample {index} at byte {offset})"

    def read_bytes(self, index: int) -> bytes:
        shard, offset, size, _ = (int(value) for value in self.index[index])
        if shard not in self._files:
            self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(self._files[shard], size, offset)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes): the shard is truncated")
        return data


def write_shards(dataset, destination: str | os.PathLike, samples_per_shard: int = SAMPLES_PER_SHARD) -> Path:
    """Packs an ImageFolderDataset (its files, unchanged, in its order) into `destination` (a new or empty folder):
    tar shards of `samples_per_shard` samples, the byte index and the metadata. Returns `destination`."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise ConfigError(f"{destination} is not empty; choose a new folder for the shards")
    destination.mkdir(parents=True, exist_ok=True)
    index = np.zeros((len(dataset.samples), 4), dtype=np.int64)
    shards = []
    for start in range(0, len(dataset.samples), samples_per_shard):
        shards.append(f"shard-{len(shards):06d}.tar")
        with tarfile.open(destination / shards[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for position in range(start, min(start + samples_per_shard, len(dataset.samples))):
                path, label = dataset.samples[position]
                key = f"{position:09d}"
                data = Path(path).read_bytes()
                member = tarfile.TarInfo(f"{key}{Path(path).suffix.lower()}")
                member.size = len(data)
                index[position] = (len(shards) - 1, tar.offset + len(member.tobuf(tar.format)), len(data), label)
                tar.addfile(member, io.BytesIO(data))
                label_member = tarfile.TarInfo(f"{key}.cls")
                label_member.size = len(str(label))
                tar.addfile(label_member, io.BytesIO(str(label).encode()))
    np.save(destination / INDEX_FILE, index)
    meta = {"format": FORMAT, "classes": list(dataset.classes), "shards": shards, "samples": len(index)}
    (destination / META_FILE).write_text(json.dumps(meta, indent=1))  # last: its presence marks a complete split
    return destination


def convert(source: str | os.PathLike, destination: str | os.PathLike, samples_per_shard: int) -> list[str]:
    """Every split of an image folder (train/, val/ or test/; or the folder itself as train) → shard splits."""
    from engine.data.datasets import _FOLDER_SPLITS, ImageFolderDataset

    source, destination = Path(source), Path(destination)
    splits = [name for names in _FOLDER_SPLITS.values() for name in names if (source / name).is_dir()]
    folders = {name: source / name for name in splits} or {"train": source}
    for name, folder in folders.items():
        dataset = ImageFolderDataset(folder)
        write_shards(dataset, destination / name, samples_per_shard)
        print(f"{folder}: {len(dataset)} images → {destination / name}")
    return list(folders)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.data.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="an image folder (with train/ and val/ or test/, or class folders)")
    parser.add_argument("destination", help="a new folder for the shards")
    parser.add_argument("--samples_per_shard", type=int, default=SAMPLES_PER_SHARD)
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.exit(2, f"{parser.prog}: --samples_per_shard must be >= 1\n")
    try:
        convert(args.source, args.destination, args.samples_per_shard)
    except (ConfigError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: {err}\n")


if __name__ == "__main__":
    main()

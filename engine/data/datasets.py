"""Image datasets: IDX files (MNIST / Fashion-MNIST), image folders, and the Fashion-MNIST subset shipped here.

Every dataset returns samples `(RGB pixels uint8 [H, W, 3] numpy array, int label)`; unlabelled images have label
-1. Arrays, not PIL images: the transforms resample them natively and a PIL round trip alone costs 0.3-0.65 ms per
ImageNet-sized image (engine/data/pixels.py). `classes` lists the class names (index = label; empty for unlabelled
data).

`build_dataset(data_path, split)` is the single entry point. `data_path` is one of:
- "embedded:fashion_mnist": the first 6000 train / 1000 test Fashion-MNIST images shipped in `assets/` (demo);
- "fashion_mnist_full": the full 60000 / 10000 set of the Debian package `dataset-fashion-mnist`
  (installed at /usr/share/datasets/fashion-mnist/);
- a directory holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` files;
- an image folder: class subfolders (labels = folder names sorted, as torchvision's ImageFolder) or a flat folder
  of images (unlabelled pretraining). When the folder has a subfolder named after the split (`train`, or `test` /
  `val` for split "test") that subfolder is used, as in the official BEiT fine-tuning layout;
- a folder of tar shards written by `python -m engine.data.shards SRC DST` (for network filesystems): the same
  samples in the same order as the image folder it was made from.

Image folders are listed, not opened: the listing comes from an index file that is rebuilt when the folder changes
(engine/data/folder_index.py), so building a dataset over ImageNet opens no image file, on any rank.

Bad files in an image folder. Files whose extension is not an image extension are ignored (listed in
`ignored_files`). A file that fails to decode when its sample is read is replaced by a class-mate
(engine/data/encoded.py says which and why); `check_headers=True` opens every file up front instead and drops those
PIL cannot identify (listed in `skipped_files`).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from engine.config import ConfigError
from engine.data.encoded import DECODE_ERRORS, EncodedImageDataset
from engine.data.folder_index import IMG_EXTENSIONS, folder_listing
from engine.data.pixels import as_hwc

if TYPE_CHECKING:
    from engine.data.shards import ShardDataset

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PHOTOS_DIR = ASSETS_DIR / "photos"  # public-domain / CC0 photographs (ATTRIBUTION.md): demos, benchmarks, tests
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_PREFIX = "embedded:"
Split = Literal["train", "test"]

# IDX header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per dimension.
_IDX_UBYTE = 0x08
_IDX_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}
_FOLDER_SPLITS = {"train": ("train",), "test": ("test", "val")}


def _check_split(split: str) -> None:
    if split not in _IDX_PREFIXES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (raw or gzip-compressed) → uint8 array of the shape in its header.

    Raises ValueError naming the file when the magic number, type code or data size is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err}); re-download or re-extract the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'}; expected 0000 then type "
                         f"and rank bytes, e.g. 00000803 for images, 00000801 for labels)")
    type_code, ndim = raw[2], raw[3]
    if type_code != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX type code 0x{type_code:02x} is not supported, only unsigned bytes (0x08)")
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header (rank {ndim}, {len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_size != expected:
        raise ValueError(f"{path}: IDX size mismatch: header says shape {shape} ({expected} bytes) but the file holds "
                         f"{len(raw) - header_size} data bytes; the file is truncated or not an IDX file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file, gzip-compressed when `path` ends in .gz (tests, tools)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim == 0:
        raise ValueError(f"write_idx needs a uint8 array of rank >= 1, got {array.dtype} of rank {array.ndim}")
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


class IdxDataset:
    """Images and labels from a pair of IDX files (MNIST / Fashion-MNIST format), held in memory.

    Args:
        images_file: IDX of uint8 images [n, H, W] (grayscale) or [n, H, W, 3] (RGB), raw or .gz.
        labels_file: IDX of uint8 labels [n].
        classes: class names (index = label); None → "0", "1", ... up to the largest label.
    """

    def __init__(self, images_file: str | os.PathLike, labels_file: str | os.PathLike,
                 classes: Sequence[str] | None = None):
        self.images = read_idx(images_file)  # [n, H, W] or [n, H, W, 3] uint8
        self.labels = read_idx(labels_file)  # [n] uint8
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[-1] != 3):
            raise ValueError(f"{images_file}: expected images of shape [n, H, W] or [n, H, W, 3], "
                             f"got {self.images.shape}")
        if self.labels.ndim != 1:
            raise ValueError(f"{labels_file}: expected labels of shape [n], got {self.labels.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"IDX size mismatch: {images_file} has {len(self.images)} images but {labels_file} has "
                             f"{len(self.labels)} labels; pair files of the same split")
        if len(self.images) == 0:
            raise ValueError(f"{images_file}: holds no images")
        num_classes = int(self.labels.max()) + 1
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        if len(self.classes) < num_classes:
            raise ValueError(f"{labels_file}: label {num_classes - 1} has no name among {len(self.classes)} classes")
        self.num_skipped = 0  # IDX samples cannot be corrupt one by one; kept for a uniform dataset interface

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return as_hwc(self.images[index]), int(self.labels[index])  # [H, W, 3] (grey repeated)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


def _find_idx_pair(directory: Path, split: str) -> tuple[Path, Path]:
    for prefix in _IDX_PREFIXES[split]:
        for suffix in (".gz", ""):
            images = directory / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = directory / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return images, labels
    names = " or ".join(f"{p}-images-idx3-ubyte[.gz] + {p}-labels-idx1-ubyte[.gz]" for p in _IDX_PREFIXES[split])
    raise FileNotFoundError(f"{directory}: no IDX files for split {split!r} (looked for {names})")


def _is_idx_dir(directory: Path) -> bool:
    return any(directory.glob("*-idx[0-9]-ubyte*"))


def _idx_dir_dataset(directory: Path, split: str, classes: Sequence[str] | None = None) -> IdxDataset:
    images, labels = _find_idx_pair(directory, split)
    classes_file = directory / "classes.txt"
    if classes is None and classes_file.is_file():
        classes = classes_file.read_text().splitlines()
    return IdxDataset(images, labels, classes)


def embedded_dataset(name: str = "fashion_mnist", split: Split = "train") -> IdxDataset:
    """A dataset shipped in `engine/data/assets/` (no download): "fashion_mnist" = the first 6000 train and the
    first 1000 test images of Fashion-MNIST (28x28 grayscale, returned as RGB), 10 classes."""
    _check_split(split)
    directory = ASSETS_DIR / name
    if name != "fashion_mnist" or not directory.is_dir():
        raise ValueError(f"unknown embedded dataset {name!r}; available: 'fashion_mnist'")
    return _idx_dir_dataset(directory, split, FASHION_MNIST_CLASSES)


def fashion_mnist_full(split: Split = "train", directory: str | os.PathLike = FASHION_MNIST_SYSTEM_DIR) -> IdxDataset:
    """The full Fashion-MNIST (60000 train / 10000 test) from the Debian package `dataset-fashion-mnist`."""
    _check_split(split)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"full Fashion-MNIST not found at {directory}; install it with `apt-get install "
                                f"dataset-fashion-mnist`, or use data_path='embedded:fashion_mnist' (6000/1000 subset)")
    return _idx_dir_dataset(directory, split, FASHION_MNIST_CLASSES)


def _local_rank() -> int:
    """This process's rank on its node from the launcher's environment (torchrun/deepspeed, OpenMPI, MPICH, srun),
    0 outside a launch: the first process of each node lists a folder, the others wait for its index."""
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _header_ok(path: str) -> bool:
    """True when PIL identifies the file as an image (reads the header only, not the pixels)."""
    try:
        with Image.open(path):
            return True
    except DECODE_ERRORS:
        return False


class SampleTable(Sequence):
    """An image folder's (path, label) pairs in three arrays: the paths relative to `root` as one byte buffer with
    offsets, and the labels (int32). Why not a list of tuples: 185 bytes per sample against the table's 35
    (`benchmarks/bench_data.py --startup_files=50000`), so ~2.6 GB for ImageNet-22k's 14 M files, and
    every DataLoader worker ends up with its own copy, since reading a Python object writes its reference count and
    so un-shares the memory page that fork() shared (copy-on-write). Arrays are read without writes: their pages stay
    shared by all workers. `table[i]` → (path, label); iteration and `==` as for the list."""

    def __init__(self, root: str, names: Sequence[str], labels: Sequence[int]):
        encoded = [os.fsencode(name) for name in names]
        self.root = root
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(name) for name in encoded], out=self._offsets[1:])
        self._names = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        return os.path.join(self.root, self._name(index)), int(self.labels[index])

    def _name(self, index: int) -> str:
        return os.fsdecode(self._names[self._offsets[index]:self._offsets[index + 1]].tobytes())

    def __eq__(self, other) -> bool:
        if isinstance(other, SampleTable):
            return (self.root == other.root and np.array_equal(self.labels, other.labels)
                    and np.array_equal(self._offsets, other._offsets) and np.array_equal(self._names, other._names))
        return isinstance(other, Sequence) and list(self) == list(other)

    def keep(self, mask: np.ndarray) -> SampleTable:
        """The samples where `mask` is true."""
        kept = np.flatnonzero(mask)
        return SampleTable(self.root, [self._name(int(i)) for i in kept], self.labels[kept])


class ImageFolderDataset(EncodedImageDataset):
    """Images under `root`, with labels from class subfolders or unlabelled (label -1) from a flat folder.

    Args:
        root: the folder.
        layout: "classes" (one subfolder per class, searched recursively, labels = sorted folder names), "flat"
            (image files directly in root, label -1), or "auto": "classes" when root has a (non-hidden) subfolder,
            else "flat".
        check_headers: identify every file with PIL up front, so undecodable files are dropped before training
            (opens every file: minutes for ImageNet on a network filesystem). Off by default: the folder's listing
            comes from its index (engine/data/folder_index.py) and no image file is opened until a sample is read;
            files that fail then are replaced (see the module docstring).

    Attributes: `classes`, `samples` (a `SampleTable` of (path, label)), `ignored_files` (non-image extensions),
    `skipped_files` (files dropped by the header check), `num_skipped` (those plus files that failed to decode
    later in this process).
    """

    def __init__(self, root: str | os.PathLike, layout: Literal["auto", "classes", "flat"] = "auto",
                 check_headers: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} (data_path should be an image folder, a "
                                    f"directory of IDX files, 'embedded:fashion_mnist' or 'fashion_mnist_full')")
        if layout not in ("auto", "classes", "flat"):
            raise ValueError(f"layout must be 'auto', 'classes' or 'flat', got {layout!r}")
        listing = folder_listing(self.root, layout, local_rank=_local_rank())
        self.layout, self.classes = listing.layout, listing.classes
        self.check_headers = check_headers
        root_name = str(self.root)
        self.samples = SampleTable(root_name, [name for name, _ in listing.samples],
                                   [label for _, label in listing.samples])
        self.ignored_files = [os.path.join(root_name, name) for name in listing.ignored]
        self.skipped_files: list[str] = []
        if check_headers:
            readable = np.array([_header_ok(path) for path, _ in self.samples], dtype=bool)
            self.skipped_files = [path for (path, _), ok in zip(self.samples, readable) if not ok]
            self.samples = self.samples.keep(readable)
        self._check_listing(listing)
        if self.ignored_files:
            logger.info("%s: ignored %d non-image file(s), e.g. %s", self.root, len(self.ignored_files),
                        self.ignored_files[0])
        if self.skipped_files:
            logger.warning("%s: skipped %d file(s) that are not decodable images, e.g. %s", self.root,
                           len(self.skipped_files), self.skipped_files[0])
        self.index_labels(self.samples.labels)

    def _check_listing(self, listing) -> None:
        extensions = ", ".join(IMG_EXTENSIONS)
        if self.layout == "flat":
            if not self.samples:
                raise ConfigError(f"{self.root}: no readable image files ({extensions}) found")
            return
        if not self.classes:
            raise ConfigError(f"{self.root}: layout 'classes' needs one subfolder per class, found none")
        counts = np.bincount(self.samples.labels, minlength=len(self.classes))
        if (counts == 0).any():
            name = self.classes[int(np.argmin(counts))]
            raise ConfigError(f"{self.root / name}: class folder {name!r} holds no readable image ({extensions}); "
                              f"add images or remove the folder")
        loose = [name for name in listing.ignored if os.sep not in name]
        if loose:
            logger.warning("%s: %d file(s) directly in the root of a class-folder dataset are ignored", self.root,
                           len(loose))

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files) + self._num_failed_loads

    @property
    def targets(self) -> list[int]:
        return self.samples.labels.tolist()

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, index: int) -> bytes:
        with open(self.samples[index][0], "rb") as file:
            return file.read()

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def label(self, index: int) -> int:
        return self.samples[index][1]


def _image_folder_for_split(root: Path, split: str) -> ImageFolderDataset | ShardDataset:
    """The split's subfolder (train/, or test/ or val/), as an image folder or a shard split (engine/data/shards.py);
    for "train", `root` itself when it has no such subfolder."""
    from engine.data.shards import ShardDataset, is_shard_split  # here: `python -m engine.data.shards` runs cleanly
    for name in _FOLDER_SPLITS[split]:
        if is_shard_split(root / name):
            return ShardDataset(root / name)
        if (root / name).is_dir():
            return ImageFolderDataset(root / name)
    if split == "train":
        return ShardDataset(root) if is_shard_split(root) else ImageFolderDataset(root)
    raise FileNotFoundError(f"{root}: no {' or '.join(_FOLDER_SPLITS[split])} subfolder for split {split!r}")


def build_dataset(data_path: str | os.PathLike = "embedded:fashion_mnist",
                  split: Split = "train") -> IdxDataset | ImageFolderDataset | ShardDataset:
    """The dataset named by `data_path` (see the module docstring) for `split` ("train" or "test").

    Raises FileNotFoundError / ValueError with the fix before any training starts when the path is wrong, empty or
    holds mismatched files.
    """
    _check_split(split)
    spec = str(data_path)
    if spec.startswith(EMBEDDED_PREFIX):
        return embedded_dataset(spec[len(EMBEDDED_PREFIX):], split)
    if spec == "fashion_mnist_full":
        return fashion_mnist_full(split)
    root = Path(spec).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data_path {spec!r} does not exist; use an image folder, a directory of IDX files, "
                                f"'embedded:fashion_mnist' or 'fashion_mnist_full'")
    if not root.is_dir():
        raise ConfigError(f"data_path {spec!r} is a file; point it at the folder that holds the data")
    if _is_idx_dir(root):
        return _idx_dir_dataset(root, split)
    return _image_folder_for_split(root, split)

"""Datasets of encoded image files (an image folder, tar shards): decoding on read, and the bad-file rule.

A sample that fails to decode when it is read (not an image, a truncated JPEG) is replaced, with a warning, by the
next decodable sample of the SAME class (cyclically), and counted in `num_skipped` of the process that read it. Why:
the dataset length and every index→sample mapping stay fixed, so labels never shift, the sampler's shards and a
resumed run stay valid, and a bad file deep in an epoch never crashes a long run; checking every file up front would
open (or read) all of them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.data.pixels import decode_bytes, encoded_size

logger = logging.getLogger(__name__)

DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class EncodedImageDataset(ABC):
    """`dataset[i]` → (RGB uint8 [H, W, 3], label), decoded from `read_bytes(i)`; subclasses provide that,
    `label(i)` and `describe(i)` (a name for messages), and call `index_labels()`. `encoded(i)` → (the file's bytes,
    label) for a decoder elsewhere (engine/data/dali.py), with the same replacement rule on a header check."""

    classes: list[str]
    _num_failed_loads = 0

    def index_labels(self, labels: Sequence[int]) -> None:
        """label → positions of its samples, to replace a sample that fails to decode by a class-mate. Arrays (the
        positions grouped by label, ascending within a label), not lists of Python ints: see
        engine.data.datasets.SampleTable for why, at ImageNet-22k's 14 M samples."""
        labels = np.asarray(labels, dtype=np.int64)
        self._positions_by_label = np.argsort(labels, kind="stable")
        self._label_values, self._label_starts = np.unique(labels[self._positions_by_label], return_index=True)

    def _class_positions(self, label: int) -> np.ndarray:
        """The positions of `label`'s samples, ascending."""
        k = int(np.searchsorted(self._label_values, label))
        end = self._label_starts[k + 1] if k + 1 < len(self._label_starts) else len(self._positions_by_label)
        return self._positions_by_label[self._label_starts[k]:end]

    @abstractmethod
    def read_bytes(self, index: int) -> bytes:
        """Sample `index`'s encoded bytes (a file's contents)."""

    def read(self, index: int) -> np.ndarray:
        return decode_bytes(self.read_bytes(index))

    def read_header(self, index: int) -> tuple[bytes, tuple[int, int]]:
        """(encoded bytes, (width, height)) from the header alone; raises as `read` when it is not an image."""
        data = self.read_bytes(index)
        return data, encoded_size(data)

    def encoded(self, index: int) -> tuple[tuple[bytes, tuple[int, int]], int]:
        """((encoded bytes, (width, height)), label); a sample whose header is not an image's is replaced."""
        label = self.label(index)
        sample = self._load(index, self.read_header)
        return (sample if sample is not None else self._load_class_mate(index, label, self.read_header)), label

    @abstractmethod
    def describe(self, index: int) -> str:
        """Where sample `index` comes from, for messages."""

    @abstractmethod
    def label(self, index: int) -> int:
        """Sample `index`'s label (-1: unlabelled)."""

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        label = self.label(index)
        image = self._load(index)
        if image is None:
            image = self._load_class_mate(index, label)
        return image, label

    def _load(self, index: int, reader=None):
        """`reader(index)` (default: the decoded RGB pixels [H, W, 3]), or None (warned and counted) when the
        sample cannot be decoded."""
        try:
            return (reader or self.read)(index)
        except DECODE_ERRORS as err:
            self._num_failed_loads += 1
            logger.warning("cannot decode %s (%s); using the next image of the same class instead",
                           self.describe(index), err)
            return None

    def _load_class_mate(self, index: int, label: int, reader=None):
        """The first decodable image after sample `index` among the samples of `label`, cyclically."""
        positions = self._class_positions(label)
        start = int(np.searchsorted(positions, index))
        for offset in range(1, len(positions)):
            image = self._load(int(positions[(start + offset) % len(positions)]), reader)
            if image is not None:
                return image
        name = self.classes[label] if label >= 0 else "unlabelled"
        raise RuntimeError(f"{self.describe(index)}: no image of class {label} ({name}) could be decoded; check the "
                           f"files of that class")

"""Datasets of encoded image files (an image folder, tar shards): decoding on read, and the bad-file rule.

A sample that fails to decode when it is read (not an image, a truncated JPEG) is replaced, with a warning, by the
next decodable sample of the SAME class (cyclically), and counted in `num_skipped` of the process that read it. Why:
the dataset length and every index→sample mapping stay fixed, so labels never shift, the sampler's shards and a
resumed run stay valid, and a bad file deep in an epoch never crashes a long run; checking every file up front would
open (or read) all of them.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class EncodedImageDataset:
    """`dataset[i]` → (RGB uint8 [H, W, 3], label) from `read(i)`, which subclasses provide with `describe(i)` (a
    name for messages); `labels` and `classes` are set by the subclass before `index_labels()`."""

    classes: list[str]
    _num_failed_loads = 0

    def index_labels(self, labels: Sequence[int]) -> None:
        """label → positions of its samples, to replace a sample that fails to decode by a class-mate."""
        self._positions_by_label: dict[int, list[int]] = {}
        for position, label in enumerate(labels):
            self._positions_by_label.setdefault(int(label), []).append(position)

    def read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        label = self.label(index)
        image = self._load(index)
        if image is None:
            image = self._load_class_mate(index, label)
        return image, label

    def _load(self, index: int) -> np.ndarray | None:
        """The decoded RGB pixels [H, W, 3], or None (warned and counted) when the sample cannot be decoded."""
        try:
            return self.read(index)
        except DECODE_ERRORS as err:
            self._num_failed_loads += 1
            logger.warning("cannot decode %s (%s); using the next image of the same class instead",
                           self.describe(index), err)
            return None

    def _load_class_mate(self, index: int, label: int) -> np.ndarray:
        """The first decodable image after sample `index` among the samples of `label`, cyclically."""
        positions = self._positions_by_label[label]  # ascending
        start = bisect.bisect_left(positions, index)
        for offset in range(1, len(positions)):
            image = self._load(positions[(start + offset) % len(positions)])
            if image is not None:
                return image
        name = self.classes[label] if label >= 0 else "unlabelled"
        raise RuntimeError(f"{self.describe(index)}: no image of class {label} ({name}) could be decoded; check the "
                           f"files of that class")
